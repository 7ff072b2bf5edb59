"""VSA tiling: the (4, 4, 4) cube layout of a video token grid, and moving tokens in and out of it.

Owns the pure index math of Video Sparse Attention: which token of the (F, H, W) raster lands in
which padded cube slot, how many valid tokens each cube holds, the top-k budget for a sparsity,
and the two autograd-aware reorders (raster -> cubes, cubes -> raster). No attention here.

Layout legend used in names across the vsa* modules:
  B batch, S tokens in (f, h, w) raster order (f slowest), H heads, D head dim,
  C cubes, T = 64 token slots per cube, P = C * T padded slots, K selected key cubes.
So `x_bshd` is the caller's layout and `x_bhpd` is the padded cube layout ([B, H, C*64, D]).

Inside the padded layout, cube c owns slots [64c, 64c + size_c): its valid tokens come first, in
(f, h, w) raster order within the cube, and the remaining slots are zero padding. This matches
FastVideo's layout, so the same tiled tensors can be handed to its kernels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

CUBE_FHW = (4, 4, 4)
CUBE_TOKENS = CUBE_FHW[0] * CUBE_FHW[1] * CUBE_FHW[2]


def vsa_topk(sparsity: float, num_cubes: int) -> int:
    """Key cubes kept per query cube: max(1, ceil((1 - sparsity) * num_cubes)), capped at num_cubes."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"VSA sparsity must be in [0, 1], got {sparsity}")
    if num_cubes < 1:
        raise ValueError(f"num_cubes must be positive, got {num_cubes}")
    # round() guards against (1 - 0.9) * 455 = 45.50000000000001 style float noise pushing ceil up.
    keep = math.ceil(round((1.0 - sparsity) * num_cubes, 9))
    return min(max(1, keep), num_cubes)


@dataclass(frozen=True, eq=False)
class CubeTiling:
    """Index tensors for one grid shape on one device. Built once and cached; treat as read-only.

    eq=False keeps identity hashing, so a cached tiling can itself key further caches.
    """

    grid_fhw: tuple[int, int, int]
    cubes_fhw: tuple[int, int, int]
    num_cubes: int
    num_tokens: int
    tile_index: torch.Tensor  # [P] int64: source token of each slot; num_tokens marks padding
    untile_index: torch.Tensor  # [S] int64: slot of each token
    cube_of_token: torch.Tensor  # [S] int64: cube of each token
    cube_sizes: torch.Tensor  # [C] int64: valid tokens per cube, 1..64
    slot_valid_ct: torch.Tensor  # [C, T] bool: slot holds a real token
    all_full: bool  # every cube holds 64 tokens (grid divisible by 4 in f, h, w)

    @property
    def num_slots(self) -> int:
        return self.num_cubes * CUBE_TOKENS


@functools.lru_cache(maxsize=64)
def cube_tiling(grid_fhw: tuple[int, int, int], device: torch.device | str = "cpu") -> CubeTiling:
    """The cube tiling of an (F, H, W) token grid, cached per grid shape and device."""
    grid_fhw = tuple(int(n) for n in grid_fhw)
    if len(grid_fhw) != 3 or min(grid_fhw) < 1:
        raise ValueError(f"grid_fhw must be three positive sizes, got {grid_fhw}")
    device = torch.device(device)
    num_f, num_h, num_w = grid_fhw
    cubes_fhw = tuple(-(-n // t) for n, t in zip(grid_fhw, CUBE_FHW))
    num_cubes = cubes_fhw[0] * cubes_fhw[1] * cubes_fhw[2]
    num_tokens = num_f * num_h * num_w

    # Coordinates of every slot of the padded grid, laid out [cf, ch, cw, tf, th, tw]: cube order
    # first, then raster order inside the cube.
    def axis(num_cubes_axis: int, tile: int, position: int) -> torch.Tensor:
        coord = torch.arange(num_cubes_axis * tile).view(num_cubes_axis, tile)
        shape = [1] * 6
        shape[position], shape[position + 3] = num_cubes_axis, tile
        return coord.view(shape)

    f = axis(cubes_fhw[0], CUBE_FHW[0], 0)
    h = axis(cubes_fhw[1], CUBE_FHW[1], 1)
    w = axis(cubes_fhw[2], CUBE_FHW[2], 2)
    valid_ct = ((f < num_f) & (h < num_h) & (w < num_w)).reshape(num_cubes, CUBE_TOKENS)
    token_ct = ((f * num_h + h) * num_w + w).reshape(num_cubes, CUBE_TOKENS)

    # Compact each cube's valid tokens to its first slots (stable, so raster order is kept).
    order_ct = torch.argsort((~valid_ct).to(torch.int8), dim=1, stable=True)
    token_ct = token_ct.gather(1, order_ct)
    cube_sizes = valid_ct.sum(1)
    slot_valid_ct = torch.arange(CUBE_TOKENS).view(1, -1) < cube_sizes.view(-1, 1)
    tile_index = torch.where(slot_valid_ct, token_ct, num_tokens).reshape(-1)

    valid_slots = slot_valid_ct.reshape(-1).nonzero().squeeze(1)
    untile_index = torch.empty(num_tokens, dtype=torch.long)
    untile_index[tile_index[valid_slots]] = valid_slots
    cube_of_token = untile_index // CUBE_TOKENS

    return CubeTiling(
        grid_fhw=grid_fhw,
        cubes_fhw=cubes_fhw,
        num_cubes=num_cubes,
        num_tokens=num_tokens,
        tile_index=tile_index.to(device),
        untile_index=untile_index.to(device),
        cube_of_token=cube_of_token.to(device),
        cube_sizes=cube_sizes.to(device),
        slot_valid_ct=slot_valid_ct.to(device),
        all_full=bool((cube_sizes == CUBE_TOKENS).all()),
    )


def _gather_tokens_bhsd(x_bhsd: torch.Tensor, index: torch.Tensor, has_padding: bool) -> torch.Tensor:
    """Gather along the token axis; an index equal to the token count reads a zero row."""
    if has_padding:
        zero_row = x_bhsd.new_zeros(x_bhsd.shape[0], x_bhsd.shape[1], 1, x_bhsd.shape[3])
        x_bhsd = torch.cat([x_bhsd, zero_row], dim=2)
    return x_bhsd.index_select(2, index)


class _TileTokens(torch.autograd.Function):
    """Raster [B, S, H, D] -> padded cubes [B, H, P, D]; the backward is the inverse reorder.

    Written by hand because the autograd of advanced indexing would scatter-add (index_put with
    accumulate) where a plain gather by the inverse permutation is exact and much cheaper.
    """

    @staticmethod
    def forward(ctx, x_bshd, tile_index, untile_index, has_padding):
        ctx.save_for_backward(tile_index, untile_index)
        return _gather_tokens_bhsd(x_bshd.transpose(1, 2), tile_index, has_padding)

    @staticmethod
    def backward(ctx, grad_bhpd):
        tile_index, untile_index = ctx.saved_tensors
        grad_bhsd = grad_bhpd.index_select(2, untile_index)
        return grad_bhsd.transpose(1, 2), None, None, None


class _UntileTokens(torch.autograd.Function):
    """Padded cubes [B, H, P, D] -> raster [B, S, H, D]; padded slots are dropped."""

    @staticmethod
    def forward(ctx, x_bhpd, tile_index, untile_index, has_padding):
        ctx.save_for_backward(tile_index, untile_index)
        ctx.has_padding = has_padding
        # Gathering the transposed view writes the contiguous [B, S, H, D] result in one pass.
        return x_bhpd.transpose(1, 2).index_select(1, untile_index)

    @staticmethod
    def backward(ctx, grad_bshd):
        tile_index, untile_index = ctx.saved_tensors
        grad_bhpd = _gather_tokens_bhsd(grad_bshd.transpose(1, 2), tile_index, ctx.has_padding)
        return grad_bhpd, None, None, None


def tile_tokens(x_bshd: torch.Tensor, tiling: CubeTiling) -> torch.Tensor:
    """Reorder raster tokens [B, S, H, D] into zero-padded cubes [B, H, P, D] (contiguous)."""
    if x_bshd.shape[1] != tiling.num_tokens:
        raise ValueError(
            f"expected {tiling.num_tokens} tokens for grid {tiling.grid_fhw}, got {x_bshd.shape[1]}"
        )
    return _TileTokens.apply(x_bshd, tiling.tile_index, tiling.untile_index, not tiling.all_full)


def untile_tokens(x_bhpd: torch.Tensor, tiling: CubeTiling) -> torch.Tensor:
    """Inverse of tile_tokens: padded cubes [B, H, P, D] -> raster tokens [B, S, H, D]."""
    if x_bhpd.shape[2] != tiling.num_slots:
        raise ValueError(f"expected {tiling.num_slots} slots, got {x_bhpd.shape[2]}")
    return _UntileTokens.apply(x_bhpd, tiling.tile_index, tiling.untile_index, not tiling.all_full)
