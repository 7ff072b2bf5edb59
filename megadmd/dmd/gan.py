"""DMD2's GAN term (paper Eq. 4 and section 4.3): a discriminator head on the fake score.

The head reads the fake score's hidden tokens after block ``block_index`` (a forward hook, so the
diffusers model code is untouched), and is a submodule of the fake score: its parameters live in
the fake score's ZeRO-3 engine (in a param group of their own, with their own learning rate and
betas), train with it, and are saved and resumed with it.

- the fake-score update adds ``discriminator_weight * softplus(-D(real)) + softplus(D(fake))``,
  real = noised dataset latents, fake = noised generator samples, in a forward of their own: each
  real latent and the generated sample of the same prompt share a timestep and a noise draw, and
  the timesteps are uniform in ``timestep_range`` (low noise by default);
- the generator update adds ``generator_weight * softplus(-D(fake))`` (non-saturating), with the
  fake score's parameters frozen for that forward, so its gradient reaches the generator only
  through the generator's output.

Why the head used to stay at chance on the toy (tools/gan_probe.py, docs/quality-benchmark.md): it
judged at the DMD timesteps, mostly high noise where real and generated latents look alike; it
learned at the fake score's small rate with Adam's beta1 = 0 from a signal that was mostly noise;
and mean pooling of normalized tokens dropped the per-token spread that tells real samples (with
their fine noise) from blurred ones.

FastVideo has no GAN term; DMD2 credits it with letting the student beat the teacher.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_ATTR = "gan_head"  # the head's attribute on the fake score module; stripped on export


POOLINGS = ("mean", "meanstd")


class GANHead(nn.Module):
    """Tokens ``[B, S, D]`` -> one logit per sample: norm, MLP per token, pooled over tokens
    (``mean``, or ``meanstd``: mean and standard deviation concatenated), linear."""

    def __init__(self, dim: int, hidden: int, pooling: str = "meanstd"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling '{pooling}' (expected one of {POOLINGS})")
        self.pooling = pooling
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.proj = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden * (2 if pooling == "meanstd" else 1), 1)

    def token_features(self, tokens_bsd: torch.Tensor) -> torch.Tensor:
        return F.silu(self.proj(self.norm(tokens_bsd.float()).to(self.proj.weight.dtype)))

    def forward(self, tokens_bsd: torch.Tensor, seq_ctx=None) -> torch.Tensor:
        """``seq_ctx``: the model's SequenceContext when its tokens are sp-sharded."""
        from ..parallel.ulysses import pool_tokens

        h = self.token_features(tokens_bsd).float()
        pooled = pool_tokens(h, seq_ctx)
        if self.pooling == "meanstd":
            # the spread over tokens from the mean of squares: one more sum over the sp group
            std = (pool_tokens(h * h, seq_ctx) - pooled * pooled).clamp(min=1e-6).sqrt()
            pooled = torch.cat([pooled, std], dim=-1)
        return self.out(pooled.to(self.out.weight.dtype)).squeeze(-1).float()


def attach_gan_head(module: nn.Module, hidden: int, seed: int, pooling: str = "meanstd") -> GANHead:
    """Add a freshly initialized head to a Wan DiT (identically on every rank: seeded)."""
    dim = module.config.num_attention_heads * module.config.attention_head_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = GANHead(dim, hidden, pooling)
    setattr(module, HEAD_ATTR, head)
    return head


def judge_timesteps(u: torch.Tensor, lo: float, hi: float, boundary_ratio: Optional[float] = None,
                    u_shared: float = 0.0) -> torch.Tensor:
    """Timesteps where real and generated latents are judged: uniform in ``[lo, hi] * 1000`` for
    uniform ``u``. With two experts (``boundary_ratio``), ``u_shared`` (one draw per global
    micro-step) puts the whole micro-batch on one side of the boundary, each side with the share
    of the range it covers, so the draws stay uniform and one forward runs on one expert."""
    from ..flow import NUM_TRAIN_TIMESTEPS, keep_side, stratified_u

    if boundary_ratio is None:
        return (lo + (hi - lo) * u) * NUM_TRAIN_TIMESTEPS
    split = min(max((boundary_ratio - lo) / (hi - lo), 0.0), 1.0)
    t = (lo + (hi - lo) * stratified_u(u, u_shared, split)) * NUM_TRAIN_TIMESTEPS
    # float32 rounding near the split must not cross to the other expert (flow.expert_score_timesteps)
    return keep_side(t, boundary_ratio * NUM_TRAIN_TIMESTEPS, high=u_shared >= split)


def judge_inputs(real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``[2B, ...]``: real latents, then generated ones, each pair noised with the same ``eps`` to the
    same ``t``, so the head compares the clean contents rather than two noise draws."""
    from ..flow import add_noise, sigma_from_t

    sigma = sigma_from_t(t)
    return torch.cat([add_noise(real.float(), eps, sigma), add_noise(fake, eps, sigma)])


def discriminator_stats(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> dict:
    """What TensorBoard shows of the head: its accuracy on each side (real judged real, generated
    judged generated; 0.5 is chance) and the mean and spread of its logits."""
    r, f = real_logits.detach().float(), fake_logits.detach().float()
    return {"gan/accuracy_real": (r > 0).float().mean(), "gan/accuracy_fake": (f < 0).float().mean(),
            "gan/logit_real": r.mean(), "gan/logit_fake": f.mean(),
            "gan/logit_real_std": r.std() if r.numel() > 1 else r.new_zeros(()),
            "gan/logit_fake_std": f.std() if f.numel() > 1 else f.new_zeros(())}


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
    from ..zero import leaf_reduce_hooks_off

    # A two-expert fake score is entered at the expert itself: run through the wrapper module,
    # ZeRO-3's backward hooks lose track of the wrapper in this input-only backward.
    target = expert_for(fake_score, t)
    with frozen(fake_score), leaf_reduce_hooks_off(fake_score), head_logits(fake_score, block_index) as out:
        predict_velocity(target, x_t, t, text, dtype, **conditioning)
    return generator_loss(out["logits"])
