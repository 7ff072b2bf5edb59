"""Monitoring: rank-averaged scalars, memory, timers, the log line, and the writer that sends them
to the tracking backends from rank 0 (monitoring/backends.py).

Tags (README, "Monitoring"): ``loss/generator``, ``loss/fake_score``, ``grad_norm/<role>``,
``lr/<role>``, ``time/step_s``, ``throughput/samples_per_s``, ``memory/<what>_gib``,
``stats/<what>``, ``health/skipped_steps[/<role>]``.
"""
from __future__ import annotations

import logging
import resource
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("megadmd")


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
    """Rank 0's sink for scalars, images, text and histograms, fanned out to the run's tracking
    backends (monitoring/backends.py: TensorBoard in ``<output_dir>/tensorboard``, Weights &
    Biases); a no-op on other ranks or with no backend."""

    def __init__(self, output_dir: str | Path, enabled: bool, logging_cfg=None, resuming: bool = False):
        from .monitoring.backends import TensorBoardBackend, WandbBackend

        names = logging_cfg.active_backends if logging_cfg is not None else ["tensorboard"]
        self._backends = []
        if enabled:
            for name in names:
                if name == "tensorboard":
                    self._backends.append(TensorBoardBackend(output_dir))
                elif name == "wandb":
                    self._backends.append(WandbBackend(
                        output_dir, logging_cfg.wandb_project, logging_cfg.wandb_entity,
                        logging_cfg.wandb_run_name, resuming=resuming))
        self.enabled = bool(self._backends)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for b in self._backends:
            b.scalars(values, step)

    def image(self, tag: str, image_chw: torch.Tensor, step: int, caption: Optional[str] = None) -> None:
        """``image_chw``: float in [0, 1]; ``caption`` says what the picture shows."""
        for b in self._backends:
            b.image(tag, image_chw, step, caption)

    def text(self, tag: str, text: str, step: int) -> None:
        for b in self._backends:
            b.text(tag, text, step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        for b in self._backends:
            b.histogram(tag, values, step)

    def run_info(self, config: dict, hparams: dict, metric_tags: list, step: int = 0) -> None:
        """The resolved config (text), the main hyperparameters, and which scalar tags are the
        run's result metrics (TensorBoard's hparams plugin shows their final values)."""
        for b in self._backends:
            b.run_info(config, hparams, metric_tags, step)

    def flush(self) -> None:
        for b in self._backends:
            b.flush()

    def close(self) -> None:
        for b in self._backends:
            b.close()
        self._backends = []
        self.enabled = False


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
