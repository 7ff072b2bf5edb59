"""Progress of long commands: a tqdm bar on a terminal, periodic plain log lines elsewhere.

Only rank 0 reports (its own share of the work, which under a launcher is about 1/world of it).
On a terminal (stderr is a TTY and ``CI`` is not set) the bar is tqdm's, on stderr; log lines
printed meanwhile go above it (monitoring/console.py). In a log file or under CI a bar's
carriage returns would be noise, so the same progress comes as plain log lines instead: at the
first step, then at most every ``MEGADMD_PROGRESS_INTERVAL_S`` seconds (default 30), and at the
end, e.g. ``synth: 40/120 samples (33%), 1m12s elapsed, eta 2m24s``.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional

log = logging.getLogger("megadmd")
DEFAULT_INTERVAL_S = 30.0


def on_terminal() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """``update(n)`` after each piece of work; ``close()`` (or a ``with`` block) at the end.

    ``enabled`` False (ranks other than 0) makes it silent. ``tty`` forces the bar (True) or the
    plain lines (False); None decides by the terminal. ``plain`` False keeps a terminal bar but
    prints no plain lines (for work that logs its own periodic lines, like training).
    """

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True,
                 tty: Optional[bool] = None, plain: bool = True, initial: int = 0):
        self.total = max(int(total), 0)
        self.desc = desc
        self.unit = unit
        self.done = initial
        self._start_done = initial
        self.enabled = enabled
        self._bar = None
        self._plain = enabled and plain and not (on_terminal() if tty is None else tty)
        self._t0 = time.perf_counter()
        self._last_line = None
        self._interval_s = float(os.environ.get("MEGADMD_PROGRESS_INTERVAL_S", DEFAULT_INTERVAL_S))
        if enabled and (on_terminal() if tty is None else tty):
            from tqdm import tqdm

            # disable=False: TQDM_DISABLE (console.py sets it for logs) is for other libraries' bars
            self._bar = tqdm(total=self.total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                             dynamic_ncols=True, leave=True, disable=False)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
        elif self._plain:
            now = time.perf_counter()
            if self._last_line is None or now - self._last_line >= self._interval_s or self.done >= self.total:
                self._last_line = now
                log.info(self.line(now - self._t0))

    def line(self, elapsed_s: float) -> str:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        rate = (self.done - self._start_done) / max(elapsed_s, 1e-9)
        eta = f", eta {_clock((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        return f"{self.desc}: {self.done}/{self.total} {self.unit}{pct}, {_clock(elapsed_s)} elapsed{eta}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress(total: int, desc: str, unit: str = "it", rank: Optional[int] = None, world_size: int = 1,
             **kwargs) -> Progress:
    """A Progress that reports on rank 0 only (``rank`` defaults to the launcher's RANK); with
    ``world_size`` > 1 its description says the count is rank 0's share."""
    from .console import env_rank

    if world_size > 1:
        desc = f"{desc} (rank 0 of {world_size})"
    return Progress(total, desc, unit, enabled=(env_rank() if rank is None else rank) == 0, **kwargs)
