"""An fp32 EMA of the generator under ZeRO-3, kept per rank on that rank's partition.

Each rank keeps one fp32 tensor per trainable parameter, shaped like its local partition, and
after every generator optimizer step does ``ema.lerp_(local_fp32_partition, 1 - decay)``: exact,
and with no communication. (The common DeepSpeed-Chat pattern gathers with GatheredParameters
without ``modifier_rank`` and silently never changes: deepspeed-notes.md.)

The EMA starts at the first generator update at or after ``start_step``, from the weights of that
moment (no cold-start contamination). A full copy is gathered only to save a world-size
independent checkpoint, to export, or to apply it for validation.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.distributed as dist


def _local_fp32(p: torch.nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(p)


def _gather_full(partition: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
    """All-gather a partition-shaped tensor over ``p``'s partition group into ``p``'s full shape."""
    group = p.ds_process_group
    world = dist.get_world_size(group)
    out = torch.empty(world * partition.numel(), dtype=partition.dtype, device=partition.device)
    dist.all_gather_into_tensor(out, partition.contiguous(), group=group)
    return out[: p.ds_numel].view(p.ds_shape)


def _slice_partition(full: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's partition of a full tensor, padded like ZeRO-3 pads ``ds_tensor``."""
    group = p.ds_process_group
    rank, n = dist.get_rank(group), p.ds_tensor.numel()
    flat = full.reshape(-1).float()
    part = torch.zeros(n, dtype=torch.float32, device=p.ds_tensor.device)
    chunk = flat[rank * n:(rank + 1) * n]
    part[: chunk.numel()] = chunk.to(part.device)
    return part


class PartitionEMA:
    def __init__(self, module: torch.nn.Module, decay: float, start_step: int = 0):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.start_step = start_step
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.shadow: Optional[dict[str, torch.Tensor]] = None
        self.num_updates = 0

    @property
    def started(self) -> bool:
        return self.shadow is not None

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after each generator optimizer step (``step`` = the iteration number)."""
        if step < self.start_step:
            return
        if self.shadow is None:
            self.shadow = {n: _local_fp32(p).detach().float().clone() for n, p in self.params}
        else:
            for n, p in self.params:
                self.shadow[n].lerp_(_local_fp32(p).float(), 1 - self.decay)
        self.num_updates += 1

    # --- saving and loading --------------------------------------------------------------------
    def local_state(self) -> dict:
        return {"decay": self.decay, "start_step": self.start_step, "num_updates": self.num_updates,
                "shadow": None if self.shadow is None else {n: t.cpu() for n, t in self.shadow.items()}}

    def load_local_state(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        shadow = state["shadow"]
        self.shadow = None if shadow is None else {
            n: shadow[n].to(p.ds_tensor.device).float() for n, p in self.params}

    @torch.no_grad()
    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """The whole EMA, gathered (collective over the partition group); None before it starts."""
        if self.shadow is None:
            return None
        return {n: _gather_full(self.shadow[n], p).cpu() for n, p in self.params}

    def load_full_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        """Take this rank's partitions from a gathered EMA (resuming at another world size)."""
        self.shadow = {n: _slice_partition(full[n], p) for n, p in self.params}

    # --- using it -------------------------------------------------------------------------------
    @contextmanager
    def applied(self) -> Iterator[None]:
        """The module computes with the EMA weights inside the block (collective: all ranks)."""
        if self.shadow is None:
            yield
            return
        saved = {}
        for n, p in self.params:
            saved[n] = p.ds_tensor.data.clone()
            p.ds_tensor.data.copy_(self.shadow[n].to(p.ds_tensor.dtype))
        _refresh_gathered(self.params)
        try:
            yield
        finally:
            for n, p in self.params:
                p.ds_tensor.data.copy_(saved[n])
            _refresh_gathered(self.params)


def _refresh_gathered(params) -> None:
    """Persistent (small) ZeRO-3 parameters stay gathered between forwards; re-gather them from
    their partitions so a changed partition takes effect."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    live = [p for _, p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
    if live:
        live[0].all_gather(param_list=live)
