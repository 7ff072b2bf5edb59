"""Non-finite values (NaN, inf) in state that was loaded from a checkpoint or is about to be
exported: found before anything trains on it or ships it.

A checkpoint whose files match their content hashes but hold NaN was saved that way by a run that
had diverged. ``--resume auto`` does not fall back to an older checkpoint then: the older one
would most likely diverge again the same way, so the run stops with one line and a person picks
the checkpoint to resume from (docs/checkpoints.md).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from ..config import TRAINABLE_ROLES, ConfigError


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> Optional[str]:
    """'<name> holds N non-finite values' for the first floating tensor with any, else None."""
    for name, t in named:
        if torch.is_tensor(t) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return f"{name} holds {int((~torch.isfinite(t)).sum())} non-finite values (NaN or inf)"
    return None


def check_finite_state(state: dict, what: str = "the weights to write") -> None:
    """Refuse to write (export, convert) weights with a NaN or inf in them."""
    problem = first_nonfinite((f"{what}: {k}", v) for k, v in state.items())
    if problem:
        raise ConfigError(f"{problem}; the checkpoint was saved by a run that had diverged: use an earlier one")


def _engine_tensors(role: str, engine) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's share of a ZeRO engine's state: weight partitions (ds_tensor under ZeRO-3),
    the fp32 master partitions, and the optimizer's moments (Adam's exp_avg, exp_avg_sq)."""
    for name, p in engine.module.named_parameters():
        yield f"{role} weight {name}", getattr(p, "ds_tensor", p)
    opt = engine.optimizer
    for i, flat in enumerate(getattr(opt, "fp32_partitioned_groups_flat", None) or []):
        yield f"{role} fp32 master weights (group {i})", flat
    inner = getattr(opt, "optimizer", None)
    for i, state in enumerate(getattr(inner, "state", {}).values()):
        for key, value in state.items():
            yield f"{role} optimizer state {key} (group {i})", value


def local_problem(models, ema) -> Optional[str]:
    """The first non-finite value in this rank's trainable state and EMA, or None."""
    for role in TRAINABLE_ROLES:
        problem = first_nonfinite(_engine_tensors(role, models.engine(role)))
        if problem:
            return problem
    if ema is not None and ema.shadow is not None:
        return first_nonfinite((f"generator EMA {n}", t) for n, t in ema.shadow.items())
    return None


def check_loaded_state(models, ema, checkpoint_name: str, group=None) -> None:
    """Collective: every rank checks its partitions; all raise the same one-line ConfigError."""
    problem = local_problem(models, ema)
    found = [problem]
    if dist.is_initialized():
        found = [None] * dist.get_world_size(group)
        dist.all_gather_object(found, problem, group=group)
    first = next((p for p in found if p), None)
    if first:
        raise ConfigError(f"checkpoint {checkpoint_name} loads with non-finite state: {first}; it was saved by a "
                          f"run that had diverged: resume from an earlier checkpoint with --resume PATH")
