"""DMD2's GAN term (paper Eq. 4 and section 4.3): a discriminator head on the fake score.

The head reads the fake score's hidden tokens after block ``block_index`` (a forward hook, so the
diffusers model code is untouched), and is a submodule of the fake score: its parameters live in
the fake score's ZeRO-3 engine, train with it, and are saved and resumed with it.

- the fake-score update adds ``discriminator_weight * softplus(-D(real)) + softplus(D(fake))``,
  real = noised dataset latents, fake = noised generator samples;
- the generator update adds ``generator_weight * softplus(-D(fake))`` (non-saturating), with the
  fake score's parameters frozen for that forward, so its gradient reaches the generator only
  through the generator's output.

FastVideo has no GAN term; DMD2 credits it with letting the student beat the teacher.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_ATTR = "gan_head"  # the head's attribute on the fake score module; stripped on export


class GANHead(nn.Module):
    """Tokens ``[B, S, D]`` -> one logit per sample: norm, MLP per token, mean over tokens, linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.proj = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, 1)

    def token_features(self, tokens_bsd: torch.Tensor) -> torch.Tensor:
        return F.silu(self.proj(self.norm(tokens_bsd.float()).to(self.proj.weight.dtype)))

    def forward(self, tokens_bsd: torch.Tensor, seq_ctx=None) -> torch.Tensor:
        """``seq_ctx``: the model's SequenceContext when its tokens are sp-sharded."""
        from ..parallel.ulysses import pool_tokens

        pooled = pool_tokens(self.token_features(tokens_bsd), seq_ctx)
        return self.out(pooled).squeeze(-1).float()


def attach_gan_head(module: nn.Module, hidden: int, seed: int) -> GANHead:
    """Add a freshly initialized head to a Wan DiT (identically on every rank: seeded)."""
    dim = module.config.num_attention_heads * module.config.attention_head_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = GANHead(dim, hidden)
    setattr(module, HEAD_ATTR, head)
    return head


@contextmanager
def head_logits(module: nn.Module, block_index: int) -> Iterator[dict]:
    """Run the GAN head on the output of ``module.blocks[block_index]`` during the forwards inside.

    The head runs inside the model's forward (from a forward hook), so ZeRO-3 gathers and
    releases its parameters like any other submodule's. The logits land in the yielded dict.
    """
    from ..models import experts_of

    box: dict = {}
    head = getattr(module, HEAD_ATTR)
    seq_ctx = getattr(module, "megadmd_sequence_context", None)

    def hook(_mod, _inputs, output):
        if "logits" in box:  # a second expert ran: its logits would silently replace the first's
            raise RuntimeError("the GAN head ran on both experts of a two-expert fake score in one forward; "
                               "the timesteps of a discriminator batch must share one expert")
        box["logits"] = head(output, seq_ctx)

    # one head on both experts of a two-expert fake score: it reads whichever expert runs
    handles = [m.blocks[block_index].register_forward_hook(hook) for m in experts_of(module)]
    try:
        yield box
    finally:
        for h in handles:
            h.remove()


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters that do not require grad for the duration (gradients flow to inputs only)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``E[softplus(-D(real))] + E[softplus(D(fake))]``: -log sigmoid on real, -log(1 - sigmoid) on fake."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss ``E[softplus(-D(fake))] = E[-log sigmoid(D(fake))]``."""
    return F.softplus(-fake_logits).mean()


def generator_gan_loss(fake_score: nn.Module, block_index: int, x_t: torch.Tensor, t: torch.Tensor,
                       text: torch.Tensor, dtype: torch.dtype, **conditioning) -> torch.Tensor:
    """The generator's GAN loss on noised generator samples ``x_t`` (which carry the generator's
    graph). The fake score's parameters are frozen for this forward, so the gradient reaches the
    generator only through ``x_t``; ``fake_score`` must be the bare module, never its engine."""
    from ..models import expert_for, predict_velocity

    # A two-expert fake score is entered at the expert itself: run through the wrapper module,
    # ZeRO-3's backward hooks lose track of the wrapper in this input-only backward.
    target = expert_for(fake_score, t)
    with frozen(fake_score), head_logits(fake_score, block_index) as out:
        predict_velocity(target, x_t, t, text, dtype, **conditioning)
    return generator_loss(out["logits"])
