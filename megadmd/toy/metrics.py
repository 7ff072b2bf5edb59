"""Sample-quality metrics for the toy distribution: precision, mode coverage, mode entropy and a
Frechet distance to the true distribution. Tensors in, numbers out: no models, no I/O.

The trainer's TensorBoard logging and the quality benchmark both call ``evaluate``, so a number in
a log and a number in docs/quality-benchmark.md mean the same thing.

Definitions (``x`` a sample of class k, ``m_kj`` the j-th true mode of class k, D = C*F*H*W):

- ``rms(x, m) = sqrt(mean((x - m)^2))`` over all D latent elements.
- A sample *hits* mode ``m_kj`` of its own class when ``rms(x, m_kj) <= radius``.
- ``precision``: the share of samples that hit some mode of their own class.
- ``coverage``: the share of all K*M modes that are hit by at least ``min_hit_share`` (1%) of the
  samples of their class. A class without samples covers none of its modes.
- ``entropy``: each sample is assigned to the nearest mode of its class (no radius); per class,
  the entropy of that histogram divided by log M (1 = an even spread, 0 = all samples on one
  mode); averaged over the classes that have samples.
- ``frechet``: per class, the Frechet distance between the Gaussian fitted to the samples and the
  true class distribution's Gaussian moments, both projected on a fixed random ``fd_dims``-dim
  orthonormal subspace and divided by ``fd_dims``; averaged over the classes that have samples.
- ``nearest_rms``: the mean over samples of ``rms`` to the nearest mode of their class. True
  samples sit at ``noise_std``; a sampler that removes all noise sits near 0.

Why the default radius is 0.3: the RMS distance of a true sample to its mode is ``noise_std`` =
0.1 with a spread of about 0.1 / sqrt(2 D) = 0.002, so 0.3 (three noise levels) accepts every true
sample plus a model error of up to sqrt(0.3^2 - 0.1^2) = 0.28 RMS. It stays far below half the
closest distance between two modes (about 1.17 / 2), so the balls of radius 0.3 are disjoint, and
a blurred sample (an average of modes, which lies 0.6 or more from each of them; the class mean is
0.78 to 0.90 away) never counts as a hit.

Why the Frechet distance is taken in a fixed projection: with a few hundred samples per class in
D = 1024 dimensions the sample covariance has rank below D, and the exact full-space formula is
then biased by as much as the effects it should measure: for n true samples of isotropic noise of
variance s^2 it reports about ``2 D s^2 (1 - sqrt(n / D))``, i.e. 0.01 per element at n = 256,
the same as a sampler that removes all the noise. Projected on ``fd_dims`` << n orthonormal
directions the covariance is well estimated. The directions are random but fixed (a seeded QR),
so every caller measures in the same subspace. A random projection keeps on average the share
``fd_dims / D`` of any squared difference, so dividing by ``fd_dims`` puts the distance in "per
latent element" units, like a mean squared error: samples without their noise score about
``(fd_dims - M + 1) / fd_dims * noise_std^2`` = 0.0094, a dropped mode (in every class) 0.45 to
0.6. The target moments are exact: the class mean is the mean of its modes and the covariance is
``noise_std^2 I`` plus the covariance of the modes (weights 1/M). Finite samples of the true
distribution do not reach 0 (mostly the sampling noise of the mode proportions: about 0.004 at
256 samples per class, 0.0015 at 512); ``evaluate`` on true samples gives that floor, which the
benchmark reports next to every model.
"""
from __future__ import annotations

import math

import torch

from .distribution import ToySpec, modes

DEFAULT_RADIUS = 0.3
DEFAULT_MIN_HIT_SHARE = 0.01
DEFAULT_FD_DIMS = 32
FD_PROJECTION_SEED = 1729


def rms_to_modes(samples: torch.Tensor, labels: torch.Tensor, spec: ToySpec) -> torch.Tensor:
    """``[N, M]``: the RMS distance of every sample to each mode of its own class."""
    table = modes(spec).flatten(2).to(torch.float64)  # [K, M, D]
    x = samples.reshape(samples.shape[0], -1).to(torch.float64)
    own = table[labels.long()]  # [N, M, D]
    return (x[:, None, :] - own).pow(2).mean(dim=2).sqrt()


def precision(dist: torch.Tensor, radius: float = DEFAULT_RADIUS) -> float:
    """Share of samples within ``radius`` (RMS) of some mode of their class; ``dist`` from
    ``rms_to_modes``."""
    return float((dist.min(dim=1).values <= radius).double().mean())


def mode_hit_shares(dist: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    radius: float = DEFAULT_RADIUS) -> torch.Tensor:
    """``[K, M]``: the share of each class's samples within ``radius`` of each of its modes
    (0 for a class without samples)."""
    hits = (dist <= radius).double()
    out = torch.zeros(num_classes, dist.shape[1], dtype=torch.float64)
    for k in range(num_classes):
        mine = labels == k
        if mine.any():
            out[k] = hits[mine].mean(dim=0)
    return out


def coverage(dist: torch.Tensor, labels: torch.Tensor, num_classes: int,
             radius: float = DEFAULT_RADIUS, min_hit_share: float = DEFAULT_MIN_HIT_SHARE) -> float:
    """Share of all modes hit by at least ``min_hit_share`` of their class's samples."""
    shares = mode_hit_shares(dist, labels, num_classes, radius)
    return float((shares >= min_hit_share).double().mean())


def mode_entropy(dist: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Entropy of the nearest-mode histogram of each class over log M, averaged over the classes
    that have samples (1 = even spread over the M modes, 0 = one mode only; 1 when M = 1)."""
    num_modes = dist.shape[1]
    if num_modes == 1:
        return 1.0
    nearest = dist.argmin(dim=1)
    values = []
    for k in range(num_classes):
        mine = labels == k
        if not mine.any():
            continue
        p = torch.bincount(nearest[mine], minlength=num_modes).double()
        p = p / p.sum()
        p = p[p > 0]
        values.append(float(-(p * p.log()).sum()) / math.log(num_modes))
    return sum(values) / len(values) if values else float("nan")


def gaussian_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[d]`` and unbiased covariance ``[d, d]`` of the rows of ``x [n, d]``, in float64."""
    x = x.to(torch.float64)
    mean = x.mean(dim=0)
    centered = x - mean
    return mean, centered.T @ centered / max(x.shape[0] - 1, 1)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mean1: torch.Tensor, cov1: torch.Tensor,
                     mean2: torch.Tensor, cov2: torch.Tensor) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``, the squared 2-Wasserstein
    distance between two Gaussians. Exact for any PSD covariances (symmetric square roots by
    ``eigh``, negative round-off eigenvalues clamped to 0)."""
    mean1, mean2 = mean1.to(torch.float64), mean2.to(torch.float64)
    cov1, cov2 = cov1.to(torch.float64), cov2.to(torch.float64)
    root1 = _sqrtm_psd(cov1)
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0).sqrt().sum()
    value = (mean1 - mean2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross
    return float(value.clamp(min=0))


def fd_projection(spec: ToySpec, dims: int = DEFAULT_FD_DIMS) -> torch.Tensor:
    """The fixed orthonormal projection ``[D, dims]`` of the Frechet distance (seeded QR)."""
    d = math.prod(spec.latent_shape)
    g = torch.Generator().manual_seed(FD_PROJECTION_SEED)
    q, _ = torch.linalg.qr(torch.randn(d, dims, generator=g, dtype=torch.float64))
    return q


def true_class_moments(spec: ToySpec, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact projected moments of every class: means ``[K, d]`` and covariances ``[K, d, d]``.

    A class is an even mixture of ``N(m_j, noise_std^2 I)``, so its mean is the mean of the modes
    and its covariance is ``noise_std^2 I`` plus the (1/M-weighted) covariance of the modes.
    """
    table = modes(spec).flatten(2).to(torch.float64) @ proj  # [K, M, d]
    means = table.mean(dim=1)
    centered = table - means[:, None]
    covs = centered.transpose(1, 2) @ centered / spec.modes_per_class
    covs = covs + spec.noise_std ** 2 * torch.eye(proj.shape[1], dtype=torch.float64)
    return means, covs


def frechet_to_truth(samples: torch.Tensor, labels: torch.Tensor, spec: ToySpec,
                     dims: int = DEFAULT_FD_DIMS) -> float:
    """Per class Frechet distance in the fixed ``dims``-dim projection, divided by ``dims``,
    averaged over the classes that have at least two samples."""
    proj = fd_projection(spec, dims)
    true_means, true_covs = true_class_moments(spec, proj)
    x = samples.reshape(samples.shape[0], -1).to(torch.float64) @ proj
    values = []
    for k in range(spec.num_classes):
        mine = labels == k
        if int(mine.sum()) < 2:
            continue
        mean, cov = gaussian_moments(x[mine])
        values.append(frechet_distance(mean, cov, true_means[k], true_covs[k]) / dims)
    return sum(values) / len(values) if values else float("nan")


def evaluate(samples: torch.Tensor, labels: torch.Tensor, spec: ToySpec,
             radius: float = DEFAULT_RADIUS, min_hit_share: float = DEFAULT_MIN_HIT_SHARE,
             fd_dims: int = DEFAULT_FD_DIMS) -> dict[str, float]:
    """All toy metrics of ``samples [N, C, F, H, W]`` with class ``labels [N]``.

    Returns ``precision``, ``coverage``, ``entropy``, ``frechet`` and ``nearest_rms`` as defined
    in the module docstring.
    """
    if samples.shape[1:] != torch.Size(spec.latent_shape):
        raise ValueError(f"samples have shape {tuple(samples.shape[1:])} per item, "
                         f"the toy spec expects {spec.latent_shape}")
    if labels.shape != (samples.shape[0],):
        raise ValueError(f"labels must be [N] = [{samples.shape[0]}], got {tuple(labels.shape)}")
    samples, labels = samples.detach().cpu().float(), labels.detach().cpu().long()
    dist = rms_to_modes(samples, labels, spec)
    return {
        "precision": precision(dist, radius),
        "coverage": coverage(dist, labels, spec.num_classes, radius, min_hit_share),
        "entropy": mode_entropy(dist, labels, spec.num_classes),
        "frechet": frechet_to_truth(samples, labels, spec, fd_dims),
        "nearest_rms": float(dist.min(dim=1).values.mean()),
    }
