"""Ulysses sequence parallelism: all-to-all, sequence shard and gather, with their autograd.

Data flow in a Wan DiT with sp ranks (every rank of an sp group holds the same sample):

    patch embedding (full)  ->  shard tokens (pad to a multiple of sp, keep this rank's chunk)
    each block: self-attention all-to-all  [B, S/sp, H, D] -> [B, S, H/sp, D],
                RoPE with global positions, attention, inverse all-to-all;
                cross-attention on the local tokens against the full text
    gather tokens, drop the padding  ->  output norm, projection, unpatchify (full)

Gradient scale. Every rank of an sp group computes the same loss on the gathered output, and
ZeRO-3 averages gradients over all dp x sp ranks (its reduce-scatter divides by dp * sp). For that
average to equal the single-process gradient, the gradients of one sp group's ranks must *sum*
to ``sp`` times the sample's gradient. The gather's backward therefore hands each rank only its
own slice of the output gradient, summed over the sp group (a reduce-scatter): each rank of the
group holds the identical replicated upstream gradient, so the slice it receives is ``sp`` times
its share. Parameters outside the sharded region (patch embedding, output projection, condition
embedders) receive their full gradient on every rank. Both sum to ``sp`` times the sample's
gradient, so the dp x sp average is exactly the dp average of per-sample gradients -- the
dp-only result. FastVideo fixed the same bookkeeping in its PR #1138; tests/distributed checks it
parameter by parameter.

The collectives run on the ``group`` passed in (the sp group); there are no module-level groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist


# --------------------------------------------------------------------------------------------
# all-to-all between the sequence-sharded and the head-sharded layouts


def _a2a(x_pbshd: torch.Tensor, group) -> torch.Tensor:
    x_pbshd = x_pbshd.contiguous()
    out = torch.empty(x_pbshd.shape, dtype=x_pbshd.dtype, device=x_pbshd.device)  # contiguous
    dist.all_to_all_single(out, x_pbshd, group=group)
    return out


def _seq_to_head(x: torch.Tensor, group, sp: int) -> torch.Tensor:
    """``[N, B, s, H, D]`` (local sequence chunk, all heads) -> ``[N, B, s * sp, H / sp, D]``."""
    n, b, s, h, d = x.shape
    x = x.reshape(n, b, s, sp, h // sp, d).permute(3, 0, 1, 2, 4, 5)  # [sp, N, B, s, h/sp, D]
    y = _a2a(x, group)  # chunk q now holds rank q's sequence chunk of my head group
    return y.permute(1, 2, 0, 3, 4, 5).reshape(n, b, sp * s, h // sp, d)


def _head_to_seq(x: torch.Tensor, group, sp: int) -> torch.Tensor:
    """``[N, B, S, H / sp, D]`` (full sequence, local heads) -> ``[N, B, S / sp, H, D]``."""
    n, b, s_full, hl, d = x.shape
    x = x.reshape(n, b, sp, s_full // sp, hl, d).permute(2, 0, 1, 3, 4, 5)  # [sp, N, B, s, h, D]
    y = _a2a(x, group)  # chunk q now holds rank q's heads for my sequence chunk
    return y.permute(1, 2, 3, 0, 4, 5).reshape(n, b, s_full // sp, sp * hl, d)


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sp):
        ctx.group, ctx.sp = group, sp
        return _seq_to_head(x, group, sp)

    @staticmethod
    def backward(ctx, grad):
        return _head_to_seq(grad, ctx.group, ctx.sp), None, None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sp):
        ctx.group, ctx.sp = group, sp
        return _head_to_seq(x, group, sp)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_head(grad, ctx.group, ctx.sp), None, None


def seq_to_head(x_nbshd: torch.Tensor, group, sp: int) -> torch.Tensor:
    """Stacked q/k/v(/gate) ``[N, B, S/sp, H, D]`` -> ``[N, B, S, H/sp, D]``, one collective."""
    return _SeqToHead.apply(x_nbshd, group, sp)


def head_to_seq(x_nbshd: torch.Tensor, group, sp: int) -> torch.Tensor:
    """The inverse of ``seq_to_head``; its backward is ``seq_to_head``."""
    return _HeadToSeq.apply(x_nbshd, group, sp)


# --------------------------------------------------------------------------------------------
# sequence gather and a sum over the group, with the backward described in the module docstring


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_bsd, group, sp):
        ctx.group, ctx.sp = group, sp
        b, s, d = x_bsd.shape
        out = torch.empty(sp * b, s, d, dtype=x_bsd.dtype, device=x_bsd.device)  # ranks along dim 0
        dist.all_gather_into_tensor(out, x_bsd.contiguous(), group=group)
        return out.reshape(sp, b, s, d).permute(1, 0, 2, 3).reshape(b, sp * s, d)

    @staticmethod
    def backward(ctx, grad_bsd):
        b, s_full, d = grad_bsd.shape
        s = s_full // ctx.sp
        chunks = grad_bsd.reshape(b, ctx.sp, s, d).permute(1, 0, 2, 3).reshape(ctx.sp * b, s, d)
        out = torch.empty(b, s, d, dtype=grad_bsd.dtype, device=grad_bsd.device)
        # reduce-scatter: my slice, summed over the sp ranks' (identical, replicated) gradients
        dist.reduce_scatter_tensor(out, chunks, group=ctx.group)
        return out, None, None


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        g = grad.clone()
        dist.all_reduce(g, group=ctx.group)  # the same sum semantics as the gather's backward
        return g, None


def sum_over_group(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce sum whose backward is also a sum (for pooling sharded tokens)."""
    return _SumOverGroup.apply(x, group)


def padded_length(seq_len: int, sp: int) -> int:
    return math.ceil(seq_len / sp) * sp


def shard_tokens(x_bsd: torch.Tensor, sp: int, sp_rank: int) -> torch.Tensor:
    """Zero-pad the token axis to a multiple of sp and keep this rank's contiguous chunk.
    Plain slicing: its backward puts the gradient back in this rank's rows."""
    b, s, d = x_bsd.shape
    pad = padded_length(s, sp) - s
    if pad:
        x_bsd = torch.cat([x_bsd, x_bsd.new_zeros(b, pad, d)], dim=1)
    chunk = x_bsd.shape[1] // sp
    return x_bsd[:, sp_rank * chunk:(sp_rank + 1) * chunk]


def gather_tokens(x_bsd: torch.Tensor, group, sp: int, seq_len: int) -> torch.Tensor:
    """All-gather the token chunks of the sp group and drop the padding."""
    return _GatherSeq.apply(x_bsd, group, sp)[:, :seq_len]


# --------------------------------------------------------------------------------------------
# installing the shard/gather points on a Wan DiT with forward hooks (no fork of diffusers)


@dataclass
class SequenceContext:
    """Per-forward facts that the attention processors read (set by the model's pre-hook)."""

    grid: tuple = (0, 0, 0)  # post-patchify (F, H, W)
    seq_len: int = 0
    sp_group: Any = None
    sp_size: int = 1
    sp_rank: int = 0
    handles: list = field(default_factory=list)

    @property
    def sharded(self) -> bool:
        return self.sp_size > 1


def install_context(model: torch.nn.Module, ctx: SequenceContext) -> None:
    """Record the token grid of every forward; with sp > 1, shard after the patch embedding and
    gather before the output norm and projection."""

    def on_model(_mod, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        pt, ph, pw = model.config.patch_size
        ctx.grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        ctx.seq_len = ctx.grid[0] * ctx.grid[1] * ctx.grid[2]

    ctx.handles.append(model.register_forward_pre_hook(on_model, with_kwargs=True))
    if not ctx.sharded:
        return

    def on_first_block(_mod, args):
        hidden, *rest = args
        return (shard_tokens(hidden, ctx.sp_size, ctx.sp_rank), *rest)

    def on_block(_mod, args):
        hidden, text, temb, rope = args
        if temb.ndim == 4:  # Wan2.2 TI2V: per-token modulation is sharded like the tokens
            b, s, six, d = temb.shape
            temb = shard_tokens(temb.reshape(b, s, six * d), ctx.sp_size, ctx.sp_rank).reshape(b, -1, six, d)
        return (hidden, text, temb, rope)

    def on_norm_out(_mod, args):
        (hidden,) = args
        return (gather_tokens(hidden, ctx.sp_group, ctx.sp_size, ctx.seq_len),)

    ctx.handles.append(model.blocks[0].register_forward_pre_hook(on_first_block))
    for block in model.blocks:
        ctx.handles.append(block.register_forward_pre_hook(on_block))
    ctx.handles.append(model.norm_out.register_forward_pre_hook(on_norm_out))


def pool_tokens(tokens_bsd: torch.Tensor, ctx: Optional[SequenceContext]) -> torch.Tensor:
    """Mean over the valid tokens of a (possibly sp-sharded) ``[B, S, D]`` -> ``[B, D]``."""
    if ctx is None or not ctx.sharded:
        return tokens_bsd.mean(dim=1)
    chunk = tokens_bsd.shape[1]
    start = ctx.sp_rank * chunk
    valid = max(0, min(chunk, ctx.seq_len - start))
    local = tokens_bsd[:, :valid].sum(dim=1)
    return sum_over_group(local, ctx.sp_group) / ctx.seq_len
