"""DMD v1's regression loss on teacher ODE pairs (Yin et al. 2023, section 3.3), for a few-step student.

A pair is a starting noise ``z`` and the latent ``y`` the teacher's ODE (with CFG) reaches from it
(``megadmd synth --save-noise``). The student runs the first ``num_steps`` steps of its own sampler
from ``z``: x0 at each step, re-noised to the next step with fresh noise, exactly as at inference
(``sampling.sample_generator``). The re-noising draws are keyed by the pair's dataset index, so a
pair always meets the same draws and the map ``z -> x0`` being fitted is deterministic. The loss is
the mean squared error between the x0 of the last of those steps and ``y``, in latent space.

Which steps carry gradient: all of them. The re-noising is linear in the previous x0, so the loss
reaches every step's forward; with ``num_steps = 1`` it is DMD v1's one-step regression of the
first step, whose input is pure noise (DP-DMD trains that step the same way and keeps the DMD loss
for the later ones: ``dmd.train_first_step=false``).

Why it helps (docs/quality-benchmark.md): the first step sees pure noise, so the DMD loss pulls its
one output per prompt towards one mode; the ODE pairs instead tie each noise to the mode the
teacher's ODE reaches from it, so the first step decides the mode the way the teacher does, evenly.
FastVideo and DMD2 have no regression term (DMD2 dropped it for the cost of the pairs).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..sampling import VelocityFn, sample_generator


def chain_x0(vfn: VelocityFn, steps: Sequence[float], noise: torch.Tensor,
             renoise: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """The student's x0 after ``len(steps)`` steps from ``noise``, with gradient through all of them."""
    return sample_generator(vfn, steps, noise, renoise)


def regression_loss(x0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((x0 - target)^2)`` over all elements, in float32."""
    return F.mse_loss(x0.float(), target.float())
