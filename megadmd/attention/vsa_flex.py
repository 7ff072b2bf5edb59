"""VSA fine stage on FlexAttention: a BlockMask built straight from the top-k cube indices, run
through a lazily compiled `flex_attention`.

On CUDA in fp32 the compiled kernel has its own backward. On CPU FlexAttention has no backward
(and on CUDA in bf16/fp16 its backward failed to compile for 64-token blocks), so the fine stage
there is a custom autograd Function: the compiled flex forward paired with the chunked recompute
backward of vsa_torch.

Layouts follow vsa_tiling's legend (q_bhpd is [B, H, C*64, D] in padded cube order). Nothing is
compiled or probed at import time.
"""

from __future__ import annotations

import functools
import math

import torch

from megadmd.attention.vsa_tiling import CUBE_TOKENS, CubeTiling
from megadmd.attention.vsa_torch import block_sparse_backward, key_bias_ct

# What Inductor's CPU flex template accepts (torch 2.13); fp64 is refused at compile time.
_CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def flex_supported(device: torch.device) -> tuple[bool, str]:
    """Whether this torch build can run FlexAttention on `device`, and why not if it can't."""
    if device.type not in ("cpu", "cuda"):
        return False, f"FlexAttention runs on cpu and cuda, not {device.type}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return False, "CUDA is not available"
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as err:
        return False, f"torch {torch.__version__} has no FlexAttention ({err})"
    if not hasattr(BlockMask, "from_kv_blocks"):
        return False, f"torch {torch.__version__} lacks BlockMask.from_kv_blocks"
    return True, ""


@functools.cache
def _compiled_flex_attention():
    """flex_attention compiled once per process; shapes recompile inside torch.compile's cache."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _padded_key_mask_mod(tiling: CubeTiling):
    """mask_mod that hides padded key slots. Cached per tiling so torch.compile sees the same
    function (and captured tensor) on every call and does not recompile."""
    slot_valid_p = tiling.slot_valid_ct.reshape(-1)

    def padded_key_mask(batch, head, q_idx, kv_idx):
        return slot_valid_p[kv_idx]

    return padded_key_mask


def _pad_columns(indices_bhck: torch.Tensor, width: int) -> torch.Tensor:
    out = indices_bhck.new_zeros(*indices_bhck.shape[:-1], width)
    out[..., : indices_bhck.shape[-1]] = indices_bhck
    return out


def build_block_mask(kv_cubes_bhck: torch.Tensor, tiling: CubeTiling, with_backward: bool):
    """BlockMask of 64 x 64 blocks from per-query-cube selected key cubes, without a mask_mod
    sweep (which took 28 s at 29k tokens): selected full cubes become "full" blocks that skip
    masking, and selected partial cubes (grid edges) become masked blocks.
    """
    from torch.nn.attention.flex_attention import BlockMask

    num_cubes = tiling.num_cubes
    kv_cubes = kv_cubes_bhck.to(torch.int32)
    if tiling.all_full:
        full_indices, num_full = kv_cubes, kv_cubes.shape[-1]
        partial_indices = kv_cubes.new_zeros(*kv_cubes.shape[:-1], 1)
        num_partial = kv_cubes.new_zeros(kv_cubes.shape[:-1])
        num_full = torch.full_like(num_partial, num_full)
        mask_mod = None
    else:
        is_full = tiling.cube_sizes[kv_cubes_bhck] == CUBE_TOKENS
        # Stable sorts put the partial (resp. full) cubes of each row first, keeping ascending order.
        partial_first = torch.argsort(is_full.to(torch.int8), dim=-1, stable=True)
        full_first = torch.argsort((~is_full).to(torch.int8), dim=-1, stable=True)
        partial_indices = kv_cubes.gather(-1, partial_first)
        full_indices = kv_cubes.gather(-1, full_first)
        num_full = is_full.sum(-1, dtype=torch.int32)
        num_partial = (~is_full).sum(-1, dtype=torch.int32)
        mask_mod = _padded_key_mask_mod(tiling)
    return BlockMask.from_kv_blocks(
        num_partial.contiguous(),
        _pad_columns(partial_indices, num_cubes),
        num_full.contiguous(),
        _pad_columns(full_indices, num_cubes),
        BLOCK_SIZE=CUBE_TOKENS,
        mask_mod=mask_mod,
        seq_lengths=(tiling.num_slots, tiling.num_slots),
        compute_q_blocks=with_backward,
    )


# Triton tiles that divide our 64-token cubes. Left to itself, flex picks BLOCK_M = 128 for bf16
# on H100 and then refuses a BlockMask of 64-token blocks. The backward pairs follow the shape
# flex uses itself (BLOCK_N1 and BLOCK_M2 span a mask block; M1 and N2 divide them).
_CUDA_KERNEL_OPTIONS = {
    "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32
}


def _flex_forward(q_bhpd, k_bhpd, v_bhpd, block_mask) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q_bhpd.shape[-1])
    options = _CUDA_KERNEL_OPTIONS if q_bhpd.device.type == "cuda" else None
    return _compiled_flex_attention()(
        q_bhpd, k_bhpd, v_bhpd, block_mask=block_mask, scale=scale, kernel_options=options
    )


class _FlexForwardChunkedBackward(torch.autograd.Function):
    """Compiled flex forward, vsa_torch's chunked recompute backward (CPU; CUDA half precision).

    Compiled CPU flex cannot return the log-sum-exp (torch 2.13: "return_lse is not supported
    yet"); the chunked backward does not need it, as it redoes each row's softmax from the
    scores it recomputes anyway.
    """

    @staticmethod
    def forward(ctx, q_bhpd, k_bhpd, v_bhpd, kv_cubes_bhck, block_mask, key_bias):
        # Detached: CPU flex refuses inputs that require grad, even under no_grad; on CUDA it
        # would otherwise build its own (unused) backward graph.
        ctx.save_for_backward(q_bhpd, k_bhpd, v_bhpd, kv_cubes_bhck)
        ctx.key_bias = key_bias
        return _flex_forward(q_bhpd.detach(), k_bhpd.detach(), v_bhpd.detach(), block_mask)

    @staticmethod
    def backward(ctx, grad_out_bhpd):
        q_bhpd, k_bhpd, v_bhpd, kv_cubes_bhck = ctx.saved_tensors
        grads = block_sparse_backward(q_bhpd, k_bhpd, v_bhpd, grad_out_bhpd, kv_cubes_bhck, ctx.key_bias)
        return (*grads, None, None, None)


def flex_block_sparse_attention(
    q_bhpd: torch.Tensor,
    k_bhpd: torch.Tensor,
    v_bhpd: torch.Tensor,
    kv_cubes_bhck: torch.Tensor,
    tiling: CubeTiling,
) -> torch.Tensor:
    """Differentiable fine stage on FlexAttention (same contract as vsa_torch.block_sparse_attention)."""
    if q_bhpd.device.type == "cpu" and q_bhpd.dtype not in _CPU_DTYPES:
        raise TypeError(f"FlexAttention on CPU takes {_CPU_DTYPES}, got {q_bhpd.dtype}; use backend='torch'")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_bhpd, k_bhpd, v_bhpd))
    if q_bhpd.device.type == "cuda" and q_bhpd.dtype == torch.float32:
        # flex's own Triton backward (it needs the transposed mask). In half precision, torch 2.11
        # on H100 failed to lower flex_attention_backward for 64-token blocks (NoValidChoicesError
        # with every kernel_options tried), so those dtypes take the chunked backward below.
        return _flex_forward(q_bhpd, k_bhpd, v_bhpd, build_block_mask(kv_cubes_bhck, tiling, needs_grad))
    block_mask = build_block_mask(kv_cubes_bhck, tiling, with_backward=False)
    if not needs_grad:
        return _flex_forward(q_bhpd, k_bhpd, v_bhpd, block_mask)
    bias = key_bias_ct(tiling, torch.promote_types(q_bhpd.dtype, torch.float32))
    return _FlexForwardChunkedBackward.apply(q_bhpd, k_bhpd, v_bhpd, kv_cubes_bhck, block_mask, bias)
