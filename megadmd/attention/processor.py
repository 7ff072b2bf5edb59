"""The self-attention processor of Wan blocks: dense, Ulysses sequence-parallel, and/or VSA.

It plugs into diffusers' ``WanAttention`` as an attention processor (``attn1`` of every block);
cross-attention keeps diffusers' own processor, which runs the local tokens against the full
text. Tensor layout legend: ``b`` batch, ``s`` tokens, ``h`` heads, ``d`` head dim.

Per call:
1. q, k, v (and the VSA gate) from the local tokens: projections, RMS norms, split heads;
2. with sp > 1, one all-to-all of the stacked tensors: sequence-sharded with all heads ->
   full sequence with this rank's heads; the sequence padding is dropped;
3. RoPE with global positions (the model computes it for the full grid);
4. dense SDPA, or VSA on the full (F, H, W) grid;
5. re-pad, inverse all-to-all, output projection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..parallel.ulysses import SequenceContext, head_to_seq, padded_length, seq_to_head

GATE_ATTR = "to_gate_compress"  # VSA's gate projection, one per block (FastVideo's name)


def apply_rope(x_bshd: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs; freqs are ``[1, S, 1, d]``."""
    x1, x2 = x_bshd.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x_bshd)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x_bshd)


def dense_attention(q_bshd: torch.Tensor, k_bshd: torch.Tensor, v_bshd: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q_bshd.transpose(1, 2), k_bshd.transpose(1, 2),
                                         v_bshd.transpose(1, 2))
    return out.transpose(1, 2)


def vsa_sparsity_at(step: int, target: float, decay_rate: float, interval_steps: int) -> float:
    """The generator's VSA sparsity at an iteration: constant, or a staircase ramp.

    With ``interval_steps > 1`` and a positive rate, the sparsity grows by ``decay_rate`` every
    ``interval_steps`` iterations until it reaches the largest multiple of the rate not above the
    target (FastVideo's VSA_decay_rate / VSA_decay_interval_steps). Deliberate difference:
    FastVideo's ``target // rate`` in floating point stops one step short for targets such as
    0.9 / 0.03; we round the ratio first.
    """
    if interval_steps <= 1 or decay_rate <= 0:
        return target
    n_max = int(target / decay_rate + 1e-9)
    return min(step // interval_steps, n_max) * decay_rate


@dataclass
class VSASettings:
    """Mutable, so the trainer can ramp the sparsity without reinstalling processors."""

    sparsity: float = 0.0
    backend: str = "torch"


class WanSelfAttention:
    """Replaces ``WanAttnProcessor`` on a block's self-attention (``attn1``)."""

    def __init__(self, ctx: SequenceContext, vsa: Optional[VSASettings] = None, gate=None):
        self.ctx = ctx
        self.vsa = vsa
        self.gate = gate  # the VSA gate module, when it is not the block's own (a LoRA role's: megadmd/lora)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("WanSelfAttention handles self-attention without a mask only")
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        parts = [q, k, v]
        if self.vsa is not None:
            gate = self.gate if self.gate is not None else getattr(attn, GATE_ATTR)
            parts.append(gate(hidden_states).unflatten(2, (attn.heads, -1)))
        ctx = self.ctx
        stacked = torch.stack(parts)  # [n, b, s_local, h, d]
        if ctx.sharded:
            stacked = seq_to_head(stacked, ctx.sp_group, ctx.sp_size)[:, :, : ctx.seq_len]
        q, k, v = stacked[0], stacked[1], stacked[2]
        if rotary_emb is not None:
            q = apply_rope(q, *rotary_emb)
            k = apply_rope(k, *rotary_emb)
        if self.vsa is not None:
            from .vsa import video_sparse_attention

            out = video_sparse_attention(q, k, v, stacked[3], ctx.grid, self.vsa.sparsity,
                                         backend=self.vsa.backend)
        else:
            out = dense_attention(q, k, v)
        if ctx.sharded:
            pad = padded_length(ctx.seq_len, ctx.sp_size) - ctx.seq_len
            if pad:
                out = F.pad(out, (0, 0, 0, 0, 0, pad))
            out = head_to_seq(out.unsqueeze(0), ctx.sp_group, ctx.sp_size)[0]
        out = out.flatten(2, 3).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


def configure_attention(model: torch.nn.Module, *, sp_group=None, sp_size: int = 1, sp_rank: int = 0,
                        vsa: Optional[VSASettings] = None) -> SequenceContext:
    """Install our self-attention processor (and, with sp > 1, the shard/gather hooks) on a Wan DiT,
    or on both experts of a two-expert model (sharing one context: one runs at a time).

    With sp_size 1 and no VSA the model computes exactly what diffusers' own processor does.
    """
    from ..models import experts_of
    from ..parallel.ulysses import install_context

    heads = model.config.num_attention_heads
    if heads % sp_size:
        from ..config import ConfigError

        raise ConfigError(f"the model's {heads} attention heads do not divide by parallel.sp_size={sp_size}")
    ctx = SequenceContext(sp_group=sp_group, sp_size=sp_size, sp_rank=sp_rank)
    for expert in experts_of(model):
        install_context(expert, ctx)
        for block in expert.blocks:
            block.attn1.set_processor(WanSelfAttention(ctx, vsa))
    model.megadmd_sequence_context = ctx  # read by the GAN head's pooling
    return ctx
