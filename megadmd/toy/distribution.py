"""A conditional "video-latent" distribution with known modes, small enough for a CPU.

K classes, each with M fixed latent patterns ("modes") of shape [C, F, H, W]; a sample of class k
is one of its modes, chosen uniformly, plus Gaussian noise of standard deviation ``noise_std``.
The patterns move across frames (a travelling wave whose phase advances with the frame index), so
the frames of one sample differ. Every pattern is scaled to unit RMS, like normalized VAE latents.

The condition of class k is a fixed text-embedding sequence ``[text_len, text_dim]``; the
unconditional case has its own fixed "null" embedding, playing the negative prompt's part.
Everything is derived from ``seed``, so the modes are known exactly to the metrics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ToySpec:
    channels: int = 4
    frames: int = 4
    height: int = 8
    width: int = 8
    num_classes: int = 4
    modes_per_class: int = 3
    noise_std: float = 0.1
    text_len: int = 4
    text_dim: int = 32
    seed: int = 20261126

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.channels, self.frames, self.height, self.width)

    @property
    def num_modes(self) -> int:
        return self.num_classes * self.modes_per_class


def _gen(spec: ToySpec, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(spec.seed * 7 + stream)


def modes(spec: ToySpec) -> torch.Tensor:
    """The exact mode patterns, ``[K, M, C, F, H, W]`` in float32, each of unit RMS."""
    g = _gen(spec, 1)
    k, m = spec.num_classes, spec.modes_per_class
    c, f, h, w = spec.latent_shape
    ff = torch.arange(f, dtype=torch.float64).view(f, 1, 1)
    yy = torch.arange(h, dtype=torch.float64).view(1, h, 1) / h
    xx = torch.arange(w, dtype=torch.float64).view(1, 1, w) / w
    out = torch.empty(k, m, c, f, h, w, dtype=torch.float64)
    for i in range(k * m):
        for ch in range(c):
            # Two travelling waves per channel: integer spatial frequencies 1..2, a random phase,
            # and a per-frame phase velocity, so the pattern moves from frame to frame.
            wave = torch.zeros(f, h, w, dtype=torch.float64)
            for _ in range(2):
                kx, ky = torch.randint(0, 3, (2,), generator=g).tolist()
                kx, ky = (kx or 1), ky
                phase = float(torch.rand((), generator=g)) * 2 * math.pi
                speed = (float(torch.rand((), generator=g)) - 0.5) * 1.5
                amp = 0.5 + float(torch.rand((), generator=g))
                wave += amp * torch.sin(2 * math.pi * (kx * xx + ky * yy) + phase + speed * ff)
            wave += 0.5 * (float(torch.rand((), generator=g)) - 0.5)  # a per-channel offset
            out.view(k * m, c, f, h, w)[i, ch] = wave
    rms = out.pow(2).mean(dim=(2, 3, 4, 5), keepdim=True).sqrt()
    return (out / rms).float()


def class_embeddings(spec: ToySpec) -> torch.Tensor:
    """The condition of each class, ``[K, text_len, text_dim]``."""
    g = _gen(spec, 2)
    return torch.randn(spec.num_classes, spec.text_len, spec.text_dim, generator=g)


def null_embedding(spec: ToySpec) -> torch.Tensor:
    """The unconditional embedding, ``[text_len, text_dim]``; distinct from every class."""
    g = _gen(spec, 3)
    return torch.randn(spec.text_len, spec.text_dim, generator=g)


def sample(spec: ToySpec, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one sample per label. Returns ``(latents [N, C, F, H, W], mode index within class [N])``."""
    table = modes(spec)
    mode_idx = torch.randint(0, spec.modes_per_class, (labels.shape[0],), generator=generator)
    clean = table[labels, mode_idx]
    noise = torch.randn(clean.shape, generator=generator) * spec.noise_std
    return clean + noise, mode_idx
