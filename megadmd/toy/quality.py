"""Sampling the toy problem and measuring it: shared by the trainer's TensorBoard logging
(preset ``tiny``) and ``tools/quality_benchmark.py``, so both report the same numbers.

A sampler here is a function of (velocity function, noise) -> x0; the velocity function closes
over a model and the class embeddings. Noise and labels are fixed by a seed, so successive
evaluations of a run differ only by the model.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from .. import flow
from ..models import predict_velocity
from ..monitoring.diversity import grouped_diversity, x0_stats
from ..sampling import cfg_velocity, sample_generator, sample_teacher
from .distribution import ToySpec, class_embeddings, null_embedding
from .metrics import evaluate
from .render import add_legend, grid_caption, render_grid

log = logging.getLogger("megadmd")
# The tiny preset's dmd.denoising_steps: the default student schedule of the samplers below. A run
# with other steps passes its own (``student_steps``), so a student is scored on the schedule it
# was trained for.
STUDENT_STEPS = (1000, 757, 522)


def eval_inputs(spec: ToySpec, per_class: int, seed: int, device,
                num_steps: int = len(STUDENT_STEPS)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels ``[N]``, start noise ``[N, C, F, H, W]`` and re-noising noise ``[S, N, ...]``, fixed
    (``S = num_steps``, the student's step count)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(spec.num_classes).repeat_interleave(per_class)
    noise = torch.randn(labels.shape[0], *spec.latent_shape, generator=g)
    renoise = torch.randn(num_steps, labels.shape[0], *spec.latent_shape, generator=g)
    return labels, noise.to(device), renoise.to(device)


def conditions(spec: ToySpec, labels: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    cond = class_embeddings(spec)[labels].to(device)
    uncond = null_embedding(spec).unsqueeze(0).expand(labels.shape[0], -1, -1).to(device)
    return cond, uncond


@torch.no_grad()
def sample(model, kind: str, spec: ToySpec, labels: torch.Tensor, noise: torch.Tensor, renoise: torch.Tensor,
           dtype=torch.float32, guidance_scale: float = 3.5, cfg_form: str = "offset", shift: float = 3.0,
           steps: int = 50, batch: int = 256, student_steps=STUDENT_STEPS) -> torch.Tensor:
    """Samples from ``model`` with one of the benchmark's samplers:

    - ``student``: the few-step DMD sampler on ``student_steps`` (timesteps; no CFG);
    - ``teacher``: flow-matching Euler over ``euler_sigmas(steps, shift)``;
    - ``teacher_student_schedule``: Euler over the student's sigmas (by default 1, 0.757, 0.522, 0).
    ``guidance_scale`` applies to the teacher kinds (0 in the offset form = no CFG).
    """
    cond, uncond = conditions(spec, labels, noise.device)
    out = []
    for i in range(0, labels.shape[0], batch):
        sl = slice(i, i + batch)
        c, u = cond[sl], uncond[sl]
        if kind == "student":
            vfn = _velocity(model, c, dtype)
            out.append(sample_generator(vfn, student_steps, noise[sl], lambda k, sl=sl: renoise[k, sl]))
            continue
        sigmas = (flow.euler_sigmas(steps, shift) if kind == "teacher"
                  else [s / 1000 for s in student_steps] + [0.0])
        if guidance_scale == 0 and cfg_form == "offset":
            guided = _velocity(model, c, dtype)
        else:
            both = torch.cat([c, u])
            guided = cfg_velocity(lambda x, t, both=both, n=c.shape[0]: _pair(model, x, t, both, n, dtype),
                                  guidance_scale, cfg_form)
        out.append(sample_teacher(guided, None, noise[sl], sigmas))
    return torch.cat(out).float()


def score(samples: torch.Tensor, labels: torch.Tensor, spec: ToySpec) -> dict:
    """The toy metrics (``evaluate``) plus the label-free statistics a real run logs: ``diversity``
    (mean pairwise RMS distance within a class, i.e. one prompt) and the x0 statistics."""
    out = evaluate(samples, labels, spec)
    out["diversity"] = grouped_diversity(samples.cpu(), labels.cpu())
    out.update({f"x0_{k}": v for k, v in x0_stats(samples).items()})
    return out


def _velocity(model, text: torch.Tensor, dtype) -> Callable:
    return lambda x, t: predict_velocity(model, x, t, text, dtype)


def _pair(model, x, t, both, n, dtype):
    v = predict_velocity(model, torch.cat([x, x]), torch.cat([t, t]), both, dtype)
    return v[:n], v[n:]


class ToyQuality:
    """The ``tiny`` preset's validation: every ``interval_steps`` iterations the generator samples
    ``per_class`` latents per class (fixed noise), and rank 0 logs ``quality/<metric>`` (the toy
    metrics, and the diversity and x0 statistics that real runs log without known modes) and a grid
    of samples beside their class's true modes (``quality/samples``, with a legend and a caption);
    once the generator's EMA has started, its weights are scored the same way under
    ``quality_ema/``."""

    def __init__(self, spec: ToySpec, interval_steps: int, per_class: int = 64, seed: int = 42,
                 student_steps=STUDENT_STEPS):
        self.spec = spec
        self.student_steps = tuple(float(t) for t in student_steps)
        self.interval_steps = interval_steps
        self.per_class = per_class
        self.seed = seed
        self._inputs: Optional[tuple] = None
        self.history: list[tuple[int, dict]] = []  # (step, scores), for callers such as the benchmark
        self.ema_history: list[tuple[int, dict]] = []  # the same for the generator's EMA, once started

    def maybe_run(self, trainer) -> None:
        n = self.interval_steps
        if n and (trainer.state.step % n == 0 or trainer.state.step == 1):
            self.run(trainer)

    def run(self, trainer) -> dict:
        """Collective: every rank runs the generator's forwards (ZeRO-3 gathers); rank 0 logs."""
        if self._inputs is None:
            self._inputs = eval_inputs(self.spec, self.per_class, self.seed, trainer.device, len(self.student_steps))
        module = trainer.models.generator.module
        scores = self._score(trainer, module, "quality")
        self.history.append((trainer.state.step, scores))
        if trainer.ema is not None and trainer.ema.started:
            with trainer.ema.applied():
                ema_scores = self._score(trainer, module, "quality_ema")
            self.ema_history.append((trainer.state.step, ema_scores))
        return scores

    def _score(self, trainer, module, tag: str) -> dict:
        labels, noise, renoise = self._inputs
        samples = sample(module, "student", self.spec, labels, noise, renoise, trainer.models.dtype,
                         student_steps=self.student_steps).cpu()
        scores = score(samples, labels, self.spec)
        if trainer.pstate.rank == 0:
            step = trainer.state.step
            trainer.writer.scalars({f"{tag}/{k}": v for k, v in scores.items()}, step)
            grid = add_legend(render_grid(samples, labels, self.spec), self.spec)
            trainer.writer.image(f"{tag}/samples", grid.float() / 255, step, caption=grid_caption(self.spec))
            log.info("%s at step %d: %s", tag, step, ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        return scores
