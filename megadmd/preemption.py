"""Preemption: SIGTERM or SIGUSR1 on any rank stops every rank after the current iteration.

Slurm sends SIGTERM (or a configured signal such as SIGUSR1) before it preempts or times out a
job. The handler only sets a flag; after each iteration the ranks OR their flags with one small
all-reduce, so all of them stop at the same iteration, save a checkpoint together and exit 0.
"""
from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger("megadmd")
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self) -> None:
        self.received = 0
        self._previous = {}

    def install(self) -> "PreemptionFlag":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        self.received = signum

    def any_rank(self, group=None) -> bool:
        """True on every rank if any rank received a signal (collective on ``group``)."""
        from .parallel.init import collective_device

        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32, device=collective_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())
