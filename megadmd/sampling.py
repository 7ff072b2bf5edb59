"""Samplers, written against a velocity function ``v(x_t, t) -> velocity``.

- ``noised_data``: the generator's training input in synthetic-latent mode.
- ``simulate_to_exit``: DMD2's backward simulation (data-free mode, paper section 4.5), run
  without grad up to each sample's exit step; the trainer's one forward at that step follows.
- ``sample_generator``: the few-step inference sampler (denoise, re-noise with fresh noise).
- ``sample_teacher``: N-step flow-matching Euler with CFG.

The same few-step sampler inside diffusers' pipelines is ``megadmd.pipeline.DMDScheduler``.

The velocity functions close over a model; the code here only does the schedule arithmetic.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from . import flow
from .dmd.losses import cfg_combine

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def step_timesteps(steps: Sequence[float], idx: torch.Tensor, device) -> torch.Tensor:
    """Per-sample timesteps ``steps[idx]`` as a float tensor."""
    table = torch.tensor([float(s) for s in steps], dtype=torch.float32, device=device)
    return table[idx.to(device)]


def noised_data(x0_data: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """A data latent noised to the generator's step ``t``: the generator's input in synthetic-latent mode."""
    return flow.add_noise(x0_data, eps, flow.sigma_from_t(t))


def simulate_to_exit(vfn_no_grad: VelocityFn, steps: Sequence[float], exit_idx: torch.Tensor,
                     start_noise: torch.Tensor, renoise: Callable[[int], torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward simulation's no-grad prefix: the generator's own sampler from pure noise, steps
    ``0..k-1`` of each sample re-noised with fresh noise (``renoise(i)``: the noise used after step
    i) to the next step's level. Returns each sample's input at its exit step ``k`` and that step's
    timestep; samples may exit at different k, and the trajectory is advanced only up to the
    largest k in the batch."""
    device = start_noise.device
    k_max = int(exit_idx.max())
    x = start_noise
    with torch.no_grad():
        for i in range(k_max):
            t_i = torch.full((x.shape[0],), float(steps[i]), device=device)
            x0 = flow.x0_from_velocity(x, vfn_no_grad(x, t_i), flow.sigma_from_t(t_i))
            t_next = torch.full_like(t_i, float(steps[i + 1]))
            x_next = flow.add_noise(x0, renoise(i), flow.sigma_from_t(t_next))
            # Samples whose exit point is at or before step i keep their current input.
            advance = (exit_idx.to(device) > i).reshape(-1, *([1] * (x.ndim - 1)))
            x = torch.where(advance, x_next, x)
    return x, step_timesteps(steps, exit_idx, device)


def sample_generator(vfn: VelocityFn, steps: Sequence[float], noise: torch.Tensor,
                     renoise: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Few-step DMD sampling: denoise to x0 at each step, re-noise to the next; no CFG."""
    x = noise
    x0 = noise
    for i, t in enumerate(steps):
        t_i = torch.full((x.shape[0],), float(t), device=x.device)
        x0 = flow.x0_from_velocity(x, vfn(x, t_i), flow.sigma_from_t(t_i))
        if i + 1 < len(steps):
            t_next = torch.full_like(t_i, float(steps[i + 1]))
            x = flow.add_noise(x0, renoise(i), flow.sigma_from_t(t_next))
    return x0


def sample_teacher(vfn_cond: VelocityFn, vfn_uncond: Optional[VelocityFn], noise: torch.Tensor,
                   sigmas: Sequence[float], guidance_scale: float = 0.0,
                   cfg_form: str = "standard") -> torch.Tensor:
    """Flow-matching Euler from pure noise over ``sigmas`` (decreasing, ending at 0), with CFG
    when ``vfn_uncond`` is given. ``flow.euler_sigmas(N, shift)`` gives Wan's N-step schedule."""
    x = noise
    for i in range(len(sigmas) - 1):
        t = torch.full((x.shape[0],), sigmas[i] * flow.NUM_TRAIN_TIMESTEPS, device=x.device)
        v = vfn_cond(x, t)
        if vfn_uncond is not None:
            v = cfg_combine(v, vfn_uncond(x, t), guidance_scale, cfg_form)
        x = flow.euler_step(x, v, sigmas[i], sigmas[i + 1])
    return x


def cfg_velocity(v_pair: Callable[[torch.Tensor, torch.Tensor], tuple], guidance_scale: float,
                 cfg_form: str) -> VelocityFn:
    """A guided velocity function from one returning ``(v_cond, v_uncond)`` (e.g. one forward of
    batch 2B); pass it to ``sample_teacher`` with ``vfn_uncond=None``."""

    def v(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = v_pair(x_t, t)
        return cfg_combine(cond, uncond, guidance_scale, cfg_form)

    return v

