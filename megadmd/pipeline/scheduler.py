"""``DMDScheduler``: the generator's few-step DMD sampler as a diffusers scheduler, and the noise
convention that ``megadmd generate`` shares with it.

Each step predicts x0 from the velocity, ``x0 = x_t - sigma * v``, and re-noises it with fresh
noise to the next step's level, ``x = (1 - sigma') * x0 + sigma' * eps``; the last step returns
x0. There is no CFG: pipelines run it with ``guidance_scale=1``. The timesteps are the run's own
(warped where training warped them) and are pinned in the config, so ``set_timesteps`` ignores
``num_inference_steps`` and ``save_pretrained`` / ``from_pretrained`` round-trip them.

Where it stands beside the stock scheduler: exports ship diffusers' own
``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` when it can hold the run's steps
(megadmd/pipeline/stock.py), so they load with diffusers alone. That scheduler makes the same
step but derives its steps from ``num_inference_steps``, and ``WanPipeline`` calls ``step``
without its generator, so its re-noise comes from the global RNG. ``use_dmd_scheduler(pipe)``
swaps this class in for pinned steps and seeds that ``pipe(generator=g)`` controls; exports whose
steps the stock class cannot hold ship it directly.

Seeds: the pipeline draws the starting latent from ``pipe(generator=g)``; every later draw comes
from a generator per sample, seeded by a hash of that sample's starting latent (its float32
bytes). ``pipe(generator=g)`` therefore fixes all of a sample's randomness, a sample does not
depend on its batch-mates, and ``megadmd generate`` reproduces it with the functions below. All
of it is drawn on the CPU and moved to the device, so the noise does not depend on the device.
A generator passed to ``step`` explicitly is used instead, as in diffusers' own schedulers.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
# SchedulerMixin must be a name of this module: diffusers finds a custom component's load method
# by looking its base classes up in the component's module (pipeline_loading_utils).
from diffusers import ConfigMixin, SchedulerMixin  # noqa: F401
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from .. import flow
from ..config import ConfigError

log = logging.getLogger("megadmd")
DEFAULT_TIMESTEPS = (1000.0, 757.0, 522.0)


@dataclass
class DMDSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


class DMDScheduler(SchedulerMixin, ConfigMixin):
    """Few-step DMD sampling on pinned timesteps, with per-sample seeded re-noising.

    ``timesteps``: decreasing values in (0, ``num_train_timesteps``]; sigma = t / 1000.
    """

    order = 1
    init_noise_sigma = 1.0
    _compatibles = []

    @register_to_config
    def __init__(self, timesteps: Optional[list] = None, num_train_timesteps: int = flow.NUM_TRAIN_TIMESTEPS):
        steps = [float(t) for t in (DEFAULT_TIMESTEPS if timesteps is None else timesteps)]
        check_timesteps(steps, num_train_timesteps)
        self.register_to_config(timesteps=steps)
        self._begin_index: Optional[int] = None
        self.set_timesteps()

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def step_index(self) -> Optional[int]:
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      timesteps: Optional[Sequence[float]] = None) -> None:
        """The pinned timesteps (or ``timesteps``, to try others); ``num_inference_steps`` is
        ignored, with a warning when it differs from their number."""
        steps = [float(t) for t in (self.config.timesteps if timesteps is None else timesteps)]
        check_timesteps(steps, self.config.num_train_timesteps)
        if num_inference_steps is not None and num_inference_steps != len(steps):
            log.warning("DMDScheduler samples its %d pinned steps %s; num_inference_steps=%d is ignored",
                        len(steps), steps, num_inference_steps)
        self.num_inference_steps = len(steps)
        self.timesteps = torch.tensor(steps, dtype=torch.float32, device=device)
        self.sigmas = torch.cat([flow.sigma_from_t(self.timesteps), self.timesteps.new_zeros(1)])
        self._step_index: Optional[int] = None
        self._begin_index = None
        self._generators: Optional[list] = None

    def index_for_timestep(self, timestep) -> int:
        hits = (self.timesteps == torch.as_tensor(timestep, device=self.timesteps.device)).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {float(timestep)} is not one of this scheduler's {self.timesteps.tolist()}")
        return int(hits[0])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        """One DMD step from ``sample`` (x_t) and the model's velocity; float32 math, the result in
        ``sample``'s dtype."""
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        i = self._step_index
        if i >= len(self.timesteps):
            raise IndexError(f"DMDScheduler.step called {i + 1} times for {len(self.timesteps)} steps; "
                             f"call set_timesteps before sampling again")
        x_t = sample.to(torch.float32)
        if generator is None and self._generators is None:
            self._generators = renoise_generators(x_t)
        x0 = flow.x0_from_velocity(x_t, model_output.to(torch.float32), self.sigmas[i].to(x_t.device))
        sigma_next = self.sigmas[i + 1].to(x_t.device)
        if float(sigma_next) > 0:
            if generator is not None:
                noise = torch.randn(x_t.shape, generator=generator, device=generator.device).to(x_t.device)
            else:
                noise = draw_renoise(self._generators, x_t.shape, x_t.device)
            prev = flow.add_noise(x0, noise, sigma_next)
        else:
            prev = x0
        self._step_index += 1
        prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev,)
        return DMDSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


def check_timesteps(steps: Sequence[float], num_train_timesteps: int = flow.NUM_TRAIN_TIMESTEPS) -> None:
    if not steps or list(steps) != sorted(steps, reverse=True) or not all(0 < t <= num_train_timesteps for t in steps):
        raise ConfigError(f"DMD timesteps must decrease within (0, {num_train_timesteps}], got {list(steps)}")


def start_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """One sample's starting latent ``[1, C, F, H, W]`` on the CPU: what
    ``pipe(generator=torch.Generator().manual_seed(seed))`` draws for a single video."""
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def renoise_generators(start: torch.Tensor) -> list:
    """One CPU generator per sample of ``start`` ``[B, ...]``, seeded by a hash of that sample's
    float32 bytes: the source of every re-noise draw of its sampling."""
    gens = []
    for x in start.detach().to("cpu", torch.float32):
        digest = hashlib.blake2b(x.contiguous().numpy().tobytes(), digest_size=8).digest()
        gens.append(torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1)))
    return gens


def draw_renoise(generators: list, shape: Sequence[int], device) -> torch.Tensor:
    """The next re-noise ``[B, ...]``: one draw from each sample's generator, moved to ``device``."""
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} re-noise generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generators]).to(device)


def use_dmd_scheduler(pipe, model=None) -> DMDScheduler:
    """Make ``pipe`` sample with a ``DMDScheduler`` on the export's steps: pinned whatever
    ``num_inference_steps`` says, and every draw fixed by ``pipe(generator=g)``, independently of
    the batch-mates, as ``megadmd generate`` draws it.

    The steps come from ``megadmd_sampling.json`` in ``model`` (an export folder), by default the
    folder ``pipe`` was loaded from. ``pipe.save_pretrained`` then writes a folder naming this
    class (loading it needs ``import megadmd.pipeline`` first)."""
    from pathlib import Path

    from .info import SAMPLING_FILE, read_sampling_info

    folder = model if model is not None else getattr(pipe, "name_or_path", None)
    info = read_sampling_info(folder) if folder is not None and Path(folder).is_dir() else None
    if info is None:
        raise ConfigError(f"no {SAMPLING_FILE} in {folder} (a megadmd export holds one; save_pretrained does "
                          f"not copy it): pass the export folder, use_dmd_scheduler(pipe, model=...)")
    pipe.scheduler = DMDScheduler(timesteps=info["timesteps"])
    return pipe.scheduler
