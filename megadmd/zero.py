"""Small ZeRO-3 helpers: full (gathered) parameters of a partitioned module."""
from __future__ import annotations

import torch


def full_state_dict(module: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` as a full CPU tensor, gathered from the ZeRO-3 shards.

    Collective over the parameters' partition group: every rank must call it. Read-only: the
    gather has no ``modifier_rank``, so nothing written inside it would persist.
    """
    import deepspeed

    params = list(module.parameters())
    out: dict[str, torch.Tensor] = {}
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for name, p in module.named_parameters():
            out[name] = p.detach().to("cpu", dtype or p.dtype).clone()
    persistent = set(module.state_dict(keep_vars=True).keys())  # skips non-persistent buffers
    for name, b in module.named_buffers():
        if name in persistent:
            out[name] = b.detach().to("cpu").clone()
    return out
