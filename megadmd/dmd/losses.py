"""DMD2 losses and their pieces. Pure tensors: no engines, no process groups, no I/O.

Names follow the paper's roles: the *teacher* is the real score, the *fake score* is the critic,
the *generator* is the student.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..flow import NUM_TRAIN_TIMESTEPS


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float, form: str) -> torch.Tensor:
    """Classifier-free guidance, in one of two parameterizations.

    - ``offset``   (DMD2 reference, CausVid, FastVideo's legacy trainer): ``cond + s (cond - uncond)``
    - ``standard`` (Ho & Salimans, diffusers):                           ``uncond + s (cond - uncond)``

    They agree when ``s_standard = s_offset + 1``: FastVideo's default offset 3.5 is standard 4.5.
    """
    if form == "offset":
        return cond + scale * (cond - uncond)
    if form == "standard":
        return uncond + scale * (cond - uncond)
    raise ValueError(f"unknown CFG form '{form}' (expected 'offset' or 'standard')")


def limit_guidance(guided: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, interval) -> torch.Tensor:
    """Guidance only inside ``interval`` = [lo, hi] of ``t / 1000`` (per sample, inclusive); the
    conditional prediction elsewhere (Kynkaanniemi et al. 2024, "Applying guidance in a limited
    interval"). Not in FastVideo, which guides at every timestep: its default [0, 1] keeps that."""
    lo, hi = interval
    if lo <= 0 and hi >= 1:
        return guided
    r = t.float() / NUM_TRAIN_TIMESTEPS
    inside = ((r >= lo) & (r <= hi)).view(-1, *([1] * (guided.dim() - 1)))
    return torch.where(inside, guided, cond)


def dmd_grad(
    x0_gen: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, mean: str = "sample"
) -> torch.Tensor:
    """The normalized distribution-matching direction ``(x0_fake - x0_real) / mean|x0_gen - x0_real|``.

    ``mean="sample"`` normalizes each sample by its own mean absolute difference (the DMD2 reference
    and most peers); ``mean="batch"`` uses one mean over the whole batch tensor, as FastVideo does.
    The two agree at batch size 1. Non-finite values are replaced (``nan_to_num``), as in the spec.
    """
    diff = (x0_gen - x0_real).abs()
    if mean == "sample":
        denom = diff.flatten(1).mean(dim=1).reshape(-1, *([1] * (x0_gen.ndim - 1)))
    elif mean == "batch":
        denom = diff.mean()
    else:
        raise ValueError(f"unknown normalization mean '{mean}' (expected 'sample' or 'batch')")
    return torch.nan_to_num((x0_fake - x0_real) / denom)


def dmd_loss(x0_gen: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 * MSE(x0_gen, stopgrad(x0_gen - grad))``; its gradient w.r.t. x0_gen is ``grad / numel``."""
    x = x0_gen.float()
    target = (x - grad.float()).detach()
    return 0.5 * F.mse_loss(x, target)


def fake_score_loss(v_pred: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Flow-matching denoising loss of the fake score on generator samples: ``mean((v - (eps - x0))^2)``."""
    return torch.mean((v_pred.float() - (eps.float() - x0.float())) ** 2)


def real_score_only_x0(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The ``x0_fake`` that zeroes the fake score's term of the DMD direction (an ablation).

    With ``x_t = (1 - sigma) x0 + sigma eps`` a score is ``((1 - sigma) x0_hat - x_t) / sigma^2``;
    it vanishes for ``x0_hat = x_t / (1 - sigma)``, so ``x0_fake - x0_real`` then carries ``-s_real``
    alone, up to the factor ``sigma^2 / (1 - sigma)`` that the normalization absorbs anyway.
    """
    s = sigma.to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    return x_t / (1 - s)
