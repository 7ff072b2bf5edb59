"""The console of every ``megadmd`` command: log lines, and known third-party warnings filtered.

``setup_console`` is called once by the CLI entry (every command, every rank a launcher starts),
never at import of the library: a program that imports megadmd keeps its own logging and
warning settings.

Log lines go to stdout on rank 0; other ranks print warnings and errors only, on stderr. The
handler writes through ``tqdm.write`` so a line printed while a progress bar is drawn lands above
the bar instead of tearing it, and it looks up ``sys.stdout`` / ``sys.stderr`` when it writes, so
a test harness that swaps them (pytest, click's CliRunner) still captures the lines.

Warnings are filtered one by one, by exact message, category and the module that raises them,
and only when a user can do nothing about them. A warning not listed here still shows.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass

log = logging.getLogger("megadmd")


@dataclass(frozen=True)
class KnownWarning:
    category: type
    message: str  # regular expression matched at the start of the message (as ``warnings`` does)
    module: str  # regular expression for the module the warning is attributed to
    why: str


KNOWN_WARNINGS = (
    # DeepSpeed 0.19's ZeRO-3 still calls the old collective names; torch 2.13 warns on every call,
    # once per gradient reduction (151 copies in the 125-iteration default run).
    KnownWarning(FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated\. "
                 r"Please use `torch\.distributed\.reduce_scatter_single` instead\.",
                 r"torch\.distributed\.c10d_logger", "called by DeepSpeed's ZeRO-3 gradient reduction"),
    KnownWarning(FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated\. "
                 r"Please use `torch\.distributed\.all_gather_single` instead\.",
                 r"torch\.distributed\.c10d_logger", "called by DeepSpeed's ZeRO-3 parameter gathering"),
)

# Log records of other libraries dropped by (logger, exact message): DeepSpeed's accelerator
# probe warns on every CPU start although megadmd runs on the CPU on purpose (our own start-up
# line names the device).
KNOWN_LOG_RECORDS = (
    ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."),
)


def quiet_known_warnings() -> None:
    """Install one ``ignore`` filter per known warning (message, category and module)."""
    for w in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=w.message, category=w.category, module=w.module)
    for name, message in KNOWN_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.message == message for f in logger.filters):
            logger.addFilter(_DropMessage(message))


class _DropMessage(logging.Filter):
    def __init__(self, message: str):
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message


class _ConsoleHandler(logging.Handler):
    """Writes to the current sys.stdout or sys.stderr, through tqdm so progress bars stay whole."""

    def __init__(self, to_stderr: bool):
        super().__init__()
        self.to_stderr = to_stderr

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr if self.to_stderr else sys.stdout)
        except Exception:  # noqa: BLE001  (logging's contract: a failing handler never raises)
            self.handleError(record)


def env_rank() -> int:
    """This process's rank as the launcher set it (0 for a plain process)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(rank: int) -> None:
    """Log lines from rank 0 only; other ranks log warnings and errors."""
    handler = _ConsoleHandler(to_stderr=rank != 0)
    handler.setFormatter(logging.Formatter("[megadmd %(asctime)s] %(message)s", "%H:%M:%S"))
    root = logging.getLogger("megadmd")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False


def quiet_other_progress_bars(rank: int) -> None:
    """Other libraries' tqdm bars (transformers' and huggingface_hub's weight loading and saving,
    DeepSpeed's checkpoint reading) follow our rule: drawn on rank 0's terminal only, never into a
    log. Environment defaults, so a user's own setting wins; set before those libraries import."""
    from .progress import on_terminal

    if rank != 0 or not on_terminal():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def setup_console(rank: int | None = None) -> None:
    """The CLI entry's one call: known warnings filtered, log lines set up for this rank, other
    libraries' progress bars kept out of logs."""
    rank = env_rank() if rank is None else rank
    quiet_known_warnings()
    quiet_other_progress_bars(rank)
    setup_logging(rank)
