"""Two label-free statistics of generated latents, logged at every validation.

- **Sample diversity**: for each prompt, the mean pairwise RMS distance between its samples drawn
  from different noises, averaged over prompts. A generator that collapses towards one output per
  prompt drives it down (DMD's mode-seeking failure); on the toy problem it falls when the mode
  entropy falls (docs/quality-benchmark.md).
- **x0 statistics** (saturation): the standard deviation and the mean absolute value of the
  generated latents, and the share of elements beyond ``extreme`` in absolute value. Over-saturated
  students show as a growing std and extreme share next to the data's.

Tensors in, numbers out: no models, no I/O.
"""
from __future__ import annotations

import torch

DEFAULT_EXTREME = 3.0  # |x| beyond 3 is rare in normalized (unit-variance) latents


def pairwise_diversity(samples: torch.Tensor) -> float:
    """``samples [P, R, ...]``: R samples of each of P prompts. The mean over prompts of the mean
    RMS distance ``sqrt(mean((a - b)^2))`` over the R(R-1)/2 pairs of a prompt's samples."""
    if samples.ndim < 3 or samples.shape[1] < 2:
        raise ValueError(f"need [P, R >= 2, ...] samples, got shape {tuple(samples.shape)}")
    x = samples.detach().flatten(2).double()  # [P, R, D]
    d = x.shape[-1]
    sq = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").pow(2) / d  # [P, R, R]
    r = x.shape[1]
    upper = torch.triu(torch.ones(r, r, dtype=torch.bool), diagonal=1)
    return float(sq[:, upper].sqrt().mean())


def grouped_diversity(samples: torch.Tensor, groups: torch.Tensor) -> float:
    """The same for ``samples [N, ...]`` whose prompt is ``groups [N]`` (groups of any sizes >= 2;
    groups with one sample are skipped): the mean over groups of their mean pairwise RMS distance."""
    values = []
    for g in torch.unique(groups):
        mine = samples[groups == g]
        if mine.shape[0] >= 2:
            values.append(pairwise_diversity(mine.unsqueeze(0)))
    if not values:
        raise ValueError("no prompt has two or more samples")
    return sum(values) / len(values)


def x0_stats(samples: torch.Tensor, extreme: float = DEFAULT_EXTREME) -> dict[str, float]:
    """``std``, ``abs_mean`` and ``extreme_share`` (share of elements with ``|x| > extreme``)."""
    x = samples.detach().double()
    return {"std": float(x.std()), "abs_mean": float(x.abs().mean()),
            "extreme_share": float((x.abs() > extreme).double().mean())}
