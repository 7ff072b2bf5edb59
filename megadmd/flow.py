"""Flow-matching math in Wan's convention. Tensors in, tensors out: no models, no I/O.

Conventions (one place for all of them):
- A timestep ``t`` lives in [0, 1000] and its noise level is ``sigma = t / 1000``.
- Forward process: ``x_t = (1 - sigma) * x0 + sigma * eps``.
- The model predicts the velocity ``v = eps - x0``, so ``x0 = x_t - sigma * v``.
- Timestep shift: ``sigma' = s * sigma / (1 + (s - 1) * sigma)``.

Deliberate difference from FastVideo: FastVideo looks ``t`` up in a 1000-entry shifted table
and uses the nearest entry's sigma (so sigma is only approximately t/1000). We use the exact
``sigma = t / 1000``; the two agree to within one table step.
"""
from __future__ import annotations

from typing import Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000


def sigma_from_t(t: torch.Tensor) -> torch.Tensor:
    """Noise level of a timestep in [0, 1000]."""
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32) / NUM_TRAIN_TIMESTEPS


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample ``[B]`` (or scalar) sigma over a ``[B, ...]`` tensor."""
    sigma = sigma.to(device=like.device, dtype=like.dtype)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape[0], *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - sigma) * x0 + sigma * eps`` with a per-sample sigma."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * eps


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Clean-sample prediction from a velocity prediction: ``x0 = x_t - sigma * v``."""
    return x_t - _per_sample(sigma, x_t) * v


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target ``v = eps - x0``."""
    return eps - x0


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift ``s * sigma / (1 + (s - 1) * sigma)``; the identity when ``shift == 1``."""
    if shift <= 0:
        raise ValueError(f"flow shift must be positive, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_score_timesteps(
    u: torch.Tensor, shift: float, min_ratio: float, max_ratio: float
) -> torch.Tensor:
    """Timesteps for the teacher / fake-score evaluations.

    ``u`` holds uniform draws in [0, 1). They are shifted, scaled to [0, 1000] and clamped to
    ``[min_ratio, max_ratio] * 1000``, as in the spec (FastVideo draws an integer in [0, 1000)
    first; drawing u directly gives the same distribution without the integer grid).
    """
    t = shift_sigma(u, shift) * NUM_TRAIN_TIMESTEPS
    return t.clamp(min_ratio * NUM_TRAIN_TIMESTEPS, max_ratio * NUM_TRAIN_TIMESTEPS)


def warp_steps(steps: Sequence[float], shift: float) -> list[float]:
    """Map a nominal denoising-step list through the shifted schedule.

    A nominal step ``k`` becomes ``1000 * shift(k / 1000)``; with shift 8, 757 becomes about 961.
    """
    out = []
    for k in steps:
        s = float(k) / NUM_TRAIN_TIMESTEPS
        out.append(NUM_TRAIN_TIMESTEPS * shift * s / (1 + (shift - 1) * s))
    return out


def euler_sigmas(num_steps: int, shift: float) -> list[float]:
    """Sigmas of an N-step flow-matching Euler sampler, from 1 down to 0 (N + 1 values).

    Uniform in the unshifted sigma, then shifted, as Wan's pipelines do.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    base = [1.0 - i / num_steps for i in range(num_steps)]
    return [s * shift / (1 + (shift - 1) * s) for s in base] + [0.0]


def euler_step(x_t: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One flow-matching Euler step along ``dx/dsigma = v``."""
    return x_t + (sigma_next - sigma) * v



def unshift_sigma(sigma: float, shift: float) -> float:
    """The inverse of ``shift_sigma``: ``sigma / (s - (s - 1) * sigma)``."""
    return sigma / (shift - (shift - 1) * sigma)


def expert_split_u(boundary_ratio: float, shift: float, min_ratio: float, max_ratio: float) -> float:
    """The uniform draw ``u_b`` above which ``sample_score_timesteps`` gives ``t >= boundary``:
    the high-noise expert gets a share ``1 - u_b`` of score timesteps."""
    if boundary_ratio <= min_ratio:
        return 0.0
    if boundary_ratio > max_ratio:
        return 1.0
    return unshift_sigma(boundary_ratio, shift)


def expert_score_timesteps(u_sample: torch.Tensor, u_shared: float, boundary_ratio: float, shift: float,
                           min_ratio: float, max_ratio: float) -> torch.Tensor:
    """Score timesteps for a two-expert model, all on the side of ``boundary_ratio * 1000`` that
    ``u_shared`` picks (so one expert runs), spread over that side as ``sample_score_timesteps``
    spreads them without experts.

    The result is clamped to the chosen side, in the dtype the experts compare timesteps in: in
    float32, ``stratified_u`` then the shift can round a low-side draw just below the split up to
    ``t >= boundary`` (about 4e-8 per draw at shift 12, boundary 0.875), and a rank would then
    gather the other expert's parameters than its peers (a hang or a mismatch).
    """
    split = expert_split_u(boundary_ratio, shift, min_ratio, max_ratio)
    t = sample_score_timesteps(stratified_u(u_sample, u_shared, split), shift, min_ratio, max_ratio)
    return keep_side(t, boundary_ratio * NUM_TRAIN_TIMESTEPS, high=u_shared >= split)


def keep_side(t: torch.Tensor, boundary_t: float, high: bool) -> torch.Tensor:
    """``t`` clamped to ``>= boundary_t`` (high) or ``< boundary_t`` (low), compared in ``t``'s
    dtype as the experts' routing (``timestep >= boundary``) compares it."""
    b = torch.tensor(boundary_t, dtype=t.dtype, device=t.device)
    if high:
        return torch.maximum(t, b)
    return torch.minimum(t, torch.nextafter(b, torch.zeros_like(b)))


def stratified_u(u_sample: torch.Tensor, u_shared: float, split: float) -> torch.Tensor:
    """Uniform draws confined to one side of ``split``, the side chosen by ``u_shared``.

    With ``u_shared`` uniform, the side is the high one with probability ``1 - split``, and given
    the side ``u_sample`` is spread uniformly over it: each returned value is still uniform on
    [0, 1), while every sample of the batch falls on the same side (the same expert).
    """
    if u_shared >= split:
        return split + (1.0 - split) * u_sample
    return split * u_sample
