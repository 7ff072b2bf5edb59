"""Monitoring: TensorBoard events and log lines from rank 0, rank-averaged scalars, memory.

Tags (see docs/monitoring.md): ``loss/generator``, ``loss/fake_score``, ``grad_norm/<role>``,
``lr/<role>``, ``time/step_s``, ``throughput/samples_per_s``, ``memory/<what>_gib``,
``stats/<what>``, ``health/skipped_steps[/<role>]``.
"""
from __future__ import annotations

import logging
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("megadmd")


def setup_logging(rank: int) -> None:
    """Log lines from rank 0 only; other ranks log warnings and errors."""
    level = logging.INFO if rank == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    handler.setFormatter(logging.Formatter("[megadmd %(asctime)s] %(message)s", "%H:%M:%S"))
    root = logging.getLogger("megadmd")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class ScalarWindow:
    """Sums of scalars over a logging window; averaged over the window and over all ranks."""

    def __init__(self) -> None:
        self._sum: dict[str, float] = defaultdict(float)
        self._count: dict[str, int] = defaultdict(int)

    def add(self, name: str, value: float | torch.Tensor) -> None:
        self._sum[name] += float(value)
        self._count[name] += 1

    def state_dict(self) -> dict:
        return {"sum": dict(self._sum), "count": dict(self._count)}

    def load_state_dict(self, state: dict) -> None:
        self._sum = defaultdict(float, state["sum"])
        self._count = defaultdict(int, state["count"])

    def merge(self, other: "ScalarWindow") -> None:
        """Add another window's sums and counts to this one."""
        for name, total in other._sum.items():
            self._sum[name] += total
            self._count[name] += other._count[name]

    def reduce(self, group=None) -> dict[str, float]:
        """Window means, averaged over the ranks of ``group`` (collective on that group).

        Every rank must call it with the same set of names, which holds because every rank runs
        the same phases on the same iterations.
        """
        names = sorted(self._sum)
        if not names:
            return {}
        from .parallel.init import collective_device

        t = torch.tensor([[self._sum[n], self._count[n]] for n in names], dtype=torch.float64,
                         device=collective_device())
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, group=group)
        t = t.cpu()
        self._sum.clear()
        self._count.clear()
        return {n: float(t[i, 0] / t[i, 1]) for i, n in enumerate(names) if t[i, 1] > 0}


def memory_stats(device: torch.device) -> dict[str, float]:
    gib = float(1 << 30)
    if device.type == "cuda":
        return {
            "memory/max_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
            "memory/max_reserved_gib": torch.cuda.max_memory_reserved(device) / gib,
        }
    # ru_maxrss is in KiB on Linux: the peak resident memory of this process.
    return {"memory/max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib}


class MetricsWriter:
    """TensorBoard on rank 0; a no-op elsewhere. Writes into ``<output_dir>/tensorboard``."""

    def __init__(self, output_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._tb is None:
            return
        for k, v in values.items():
            self._tb.add_scalar(k, v, global_step=step)

    def image(self, tag: str, image_chw: torch.Tensor, step: int) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, image_chw, global_step=step, dataformats="CHW")

    def text(self, tag: str, text: str, step: int) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, global_step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class StepTimer:
    def __init__(self) -> None:
        self._t0: Optional[float] = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - (self._t0 or time.perf_counter())


def format_line(step: int, max_steps: int, values: dict[str, float], eta_s: float) -> str:
    keys = ("loss/generator", "loss/fake_score", "grad_norm/generator", "grad_norm/fake_score",
            "time/step_s")
    parts = [f"step {step}/{max_steps}"]
    for k in keys:
        if k in values:
            parts.append(f"{k} {values[k]:.4g}")
    if values.get("health/skipped_steps"):  # updates dropped for non-finite values, so far
        parts.append(f"skipped {int(values['health/skipped_steps'])}")
    m, s = divmod(int(eta_s), 60)
    parts.append(f"eta {m}m{s:02d}s")
    return " | ".join(parts)


class ProgressBar:
    """A dependency-free progress bar on stderr (rank 0 only): redrawn in place on a terminal,
    one line per update otherwise (logs, CI)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, width: int = 30):
        self.total = max(total, 1)
        self.desc = desc
        self.enabled = enabled
        self.width = width
        self.done = 0
        self._t0 = time.perf_counter()
        self._tty = sys.stderr.isatty()

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / max(self.done, 1e-9) * (self.total - self.done)
        line = f"{self.desc} [{bar}] {self.done}/{self.total} {elapsed:.0f}s elapsed, eta {eta:.0f}s"
        sys.stderr.write(("\r" + line) if self._tty else line + "\n")
        if self._tty and self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()
