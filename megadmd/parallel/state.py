"""The dp x sp process layout, its groups, and the ``mpu`` methods DeepSpeed reads.

Rank order (Megatron's, with context/sequence parallelism innermost):

    rank = dp_rank * sp_size + sp_rank

so an sp group is ``sp_size`` consecutive ranks and stays inside a node when ``sp_size`` divides
the GPUs per node. With world 8 and sp 2: sp groups [0,1] [2,3] [4,5] [6,7]; dp groups
[0,2,4,6] [1,3,5,7].

DeepSpeed reads this object as ``mpu`` (the same object goes to every ``deepspeed.initialize``):
- ZeRO-3 partitions parameters and reduces gradients over the *sequence-data-parallel* group
  (all dp x sp ranks), averaging over its dp * sp members.
- Batch accounting uses the *data-parallel* size (sp excluded):
  ``train_batch_size = micro_batch * grad_accum * dp``.
- Model (tensor) parallelism is 1: single-rank groups, so gradient norms are not double-counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from ..config import ConfigError


def check_layout(world_size: int, sp_size: int, num_heads: Optional[int] = None) -> int:
    """Validate a layout before any process group exists; return dp_size."""
    if sp_size < 1:
        raise ConfigError(f"parallel.sp_size must be >= 1, got {sp_size}")
    if world_size % sp_size != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.sp_size={sp_size}; "
            f"use a world size that is a multiple of {sp_size} or change parallel.sp_size"
        )
    if num_heads is not None and num_heads % sp_size != 0:
        raise ConfigError(
            f"the model's {num_heads} attention heads do not divide by parallel.sp_size={sp_size}; "
            f"choose an sp size that divides {num_heads}"
        )
    return world_size // sp_size


def layout_groups(world_size: int, sp_size: int) -> tuple[list, list]:
    """The sp groups (consecutive ranks) and dp groups (strided) of ``rank = dp_rank * sp + sp_rank``."""
    dp_size = check_layout(world_size, sp_size)
    sp_groups = [[d * sp_size + s for s in range(sp_size)] for d in range(dp_size)]
    dp_groups = [[d * sp_size + s for d in range(dp_size)] for s in range(sp_size)]
    return sp_groups, dp_groups


@dataclass
class ParallelState:
    world_size: int
    rank: int
    dp_size: int
    sp_size: int
    dp_rank: int
    sp_rank: int
    world_group: Any  # the sequence-data-parallel group: every rank
    dp_group: Any
    sp_group: Any
    mp_group: Any  # single-rank group
    dp_group_ranks: list
    sp_group_ranks: list

    @classmethod
    def build(cls, sp_size: int = 1) -> "ParallelState":
        """Create the groups. Collective: every rank calls it with the same sp_size."""
        world = dist.get_world_size()
        rank = dist.get_rank()
        dp_size = check_layout(world, sp_size)
        # dist.new_group must be called by every rank for every group, in the same order.
        world_group = dist.new_group(list(range(world)))
        sp_group = dp_group = mp_group = None
        sp_ranks = dp_ranks = None
        sp_layout, dp_layout = layout_groups(world, sp_size)
        for ranks in sp_layout:
            g = dist.new_group(ranks)
            if rank in ranks:
                sp_group, sp_ranks = g, ranks
        for ranks in dp_layout:
            g = dist.new_group(ranks)
            if rank in ranks:
                dp_group, dp_ranks = g, ranks
        for r in range(world):
            g = dist.new_group([r])
            if r == rank:
                mp_group = g
        return cls(
            world_size=world, rank=rank, dp_size=dp_size, sp_size=sp_size,
            dp_rank=rank // sp_size, sp_rank=rank % sp_size,
            world_group=world_group, dp_group=dp_group, sp_group=sp_group, mp_group=mp_group,
            dp_group_ranks=dp_ranks, sp_group_ranks=sp_ranks,
        )

    # --- sequence parallel -------------------------------------------------------------------
    def get_sequence_parallel_group(self):
        return self.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.sp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.sp_rank

    # --- ZeRO partitioning and gradient reduction: all dp x sp ranks -------------------------
    def get_sequence_data_parallel_group(self):
        return self.world_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.world_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.rank

    # --- data parallel (batch accounting, samplers) ------------------------------------------
    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_group_ranks(self) -> list:
        return list(self.dp_group_ranks)

    # --- model / tensor / pipeline parallel: none --------------------------------------------
    def get_model_parallel_group(self):
        return self.mp_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def describe(self) -> str:
        return (f"world={self.world_size} dp={self.dp_size} sp={self.sp_size} "
                f"(rank {self.rank}: dp_rank {self.dp_rank}, sp_rank {self.sp_rank})")
