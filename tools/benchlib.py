"""Shared pieces of the multi-process benchmarks in tools/ (bench_train.py, bench_sp.py, bench_load.py)."""
from __future__ import annotations

import socket
import time
from typing import Callable, Optional

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    over exec from the forking parent, so a child would report at least its parent's size."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 1024 / 1024


def timed_iterations(trainer, iters: int, warmup: int, before: Optional[Callable[[], None]] = None,
                     after: Optional[Callable[[], None]] = None) -> list[float]:
    """Run ``warmup + iters`` training iterations between barriers; the seconds of the last
    ``iters``. ``before`` runs ahead of every iteration, ``after`` after every timed one."""
    times = []
    for step in range(1, warmup + iters + 1):
        if before is not None:
            before()
        torch.distributed.barrier()
        t0 = time.perf_counter()
        trainer.train_step(step)
        torch.distributed.barrier()
        if step > warmup:
            times.append(time.perf_counter() - t0)
            if after is not None:
                after()
    return times
