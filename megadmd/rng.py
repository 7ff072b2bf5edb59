"""Per-sample randomness keyed by (run seed, stream position, purpose).

Every random draw of the training step (noise, timesteps, step indices) is made per sample from a
generator seeded by a hash of the run seed, the sample's global stream position (from the loader)
and a purpose code. Hence:
- all ranks of an sp group, which hold the same samples, draw identical noise and timesteps with
  no broadcast;
- different dp ranks hold different positions, so they draw different values;
- the draws do not depend on the dp layout or the per-rank batch size, so dp=2 x b equals
  dp=1 x 2b exactly;
- resuming needs no RNG state: the step counter and the loader position determine every draw.

A few draws must be the same on *every* rank, because they decide which modules run and ZeRO-3
gathers parameters collectively (all ranks must run the same forwards). Those are keyed by the
global micro-step instead of a sample's position: the exit step of a simulated trajectory.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Sequence

import torch

_MASK64 = (1 << 64) - 1


class Purpose(IntEnum):
    GEN_STEP_INDEX = 1  # which entry of the denoising-step list the generator trains
    GEN_NOISE = 2  # noise that takes a data latent to that step
    DMD_TIMESTEP = 3  # teacher / fake-score timestep of the DMD loss
    DMD_NOISE = 4
    FAKE_TIMESTEP = 5  # timestep of the fake-score denoising loss
    FAKE_NOISE = 6
    SIM_START = 7  # pure noise at the start of a simulated (data-free) trajectory
    SIM_RENOISE = 8  # fresh noise between simulated steps (sub-keyed by the step)
    GAN_TIMESTEP = 9
    GAN_NOISE = 10
    SIM_EXIT = 11  # the simulation's exit step: one per global micro-step, shared by all ranks
    REG_RENOISE = 12  # the regression chain's re-noising, keyed by the pair's dataset index


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, position: int, purpose: int, phase: int = 0, sub: int = 0) -> int:
    """A 63-bit seed for one sample's draw. ``phase`` separates the generator and fake-score
    phases of an iteration; ``sub`` separates repeated draws of one purpose (simulation steps)."""
    h = _splitmix64(seed & _MASK64)
    for v in (position, int(purpose), phase, sub):
        h = _splitmix64(h ^ (v & _MASK64))
    return h & ((1 << 63) - 1)


class SampleRNG:
    """Draws per-sample tensors for a batch whose samples sit at ``positions`` in the stream."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.seed = seed
        self.device = torch.device(device)

    def _gen(self, position: int, purpose: int, phase: int, sub: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(sample_seed(self.seed, position, purpose, phase, sub))
        return g

    def randn(self, positions: Sequence[int], shape: Sequence[int], purpose: int, phase: int = 0,
              sub: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[B, *shape]`` standard normal, one generator per sample."""
        return torch.stack([
            torch.randn(tuple(shape), generator=self._gen(int(p), purpose, phase, sub),
                        device=self.device, dtype=dtype)
            for p in positions
        ])

    def rand(self, positions: Sequence[int], purpose: int, phase: int = 0, sub: int = 0) -> torch.Tensor:
        """``[B]`` uniform in [0, 1)."""
        return torch.cat([
            torch.rand(1, generator=self._gen(int(p), purpose, phase, sub), device=self.device)
            for p in positions
        ])

    def randint(self, positions: Sequence[int], high: int, purpose: int, phase: int = 0,
                sub: int = 0) -> torch.Tensor:
        """``[B]`` integers in [0, high)."""
        return torch.cat([
            torch.randint(0, high, (1,), generator=self._gen(int(p), purpose, phase, sub), device=self.device)
            for p in positions
        ])
