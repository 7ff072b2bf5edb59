"""Validation during training: fixed prompts sampled by the generator (and its EMA), logged.

Every ``validation.interval_steps`` iterations the generator samples the same prompts from the
same noise with the few-step DMD sampler. Every rank takes part (ZeRO-3 gathers parameters for
each forward); rank 0 logs to TensorBoard under ``validation/<model>/<i>``: decoded frame strips
when ``validation.vae_path`` is set (and mp4 files in ``<output_dir>/validation/step-N``), otherwise
the latents rendered as images (channels 0-2 as RGB, frames side by side). With an EMA that has
started, the EMA weights are sampled as well (``validation/ema/<i>``).

Each prompt is sampled from ``validation.noises_per_prompt`` noises (the images show the first).
For real runs, where no modes are known, two label-free statistics watch for DMD's failures
(megadmd/monitoring/diversity.py): ``validation/<model>/diversity``, the mean pairwise RMS distance
between one prompt's samples (it falls when the generator collapses onto fewer outputs), and
``validation/<model>/x0_std``, ``x0_abs_mean`` and ``x0_extreme_share`` (saturation), next to the
same statistics of the training latents under ``validation/data/`` when the dataset has latents.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import ValidationConfig
from .data.format import LatentDataset
from .data.loader import pad_text
from .models import predict_velocity
from .monitoring.diversity import pairwise_diversity, x0_stats
from .rng import sample_seed
from .sampling import sample_generator

log = logging.getLogger("megadmd")
PURPOSE_START, PURPOSE_RENOISE = 301, 302


def latents_to_image(latents_cfhw: torch.Tensor) -> torch.Tensor:
    """A latent ``[C, F, H, W]`` as a ``[3, H, F * W]`` float image in [0, 1] (per-image min-max)."""
    c = latents_cfhw.shape[0]
    rgb = latents_cfhw[[i % c for i in range(3)]].float()  # [3, F, H, W]
    lo, hi = rgb.amin(), rgb.amax()
    rgb = (rgb - lo) / (hi - lo + 1e-8)
    return torch.cat(list(rgb.unbind(1)), dim=-1)


class Validator:
    def __init__(self, vcfg: ValidationConfig, steps: list, latent_shape: tuple, text_len: int,
                 training_data: LatentDataset, output_dir: str, rank: int):
        self.cfg = vcfg
        self.steps = steps
        self.latent_shape = tuple(latent_shape)
        self.rank = rank
        self.output_dir = Path(output_dir)
        ds = LatentDataset(vcfg.data_path) if vcfg.data_path else training_data
        n = min(vcfg.num_samples, len(ds))
        samples = [ds.get(i) for i in range(n)]
        self.text = torch.stack([pad_text(s["text_embeds"][: s["text_len"]], text_len)[0] for s in samples])
        self.captions = [s["caption"] for s in samples]
        self.conditioning = {}  # image-to-video: the samples' image condition
        if "image_latents" in samples[0]:
            from .data.image import condition_channels

            self.conditioning = {"condition": condition_channels(torch.stack([s["image_latents"] for s in samples])),
                                 "image_embeds": torch.stack([s["image_embeds"] for s in samples])}
        self._vae = None
        self.data_stats = None  # x0 statistics of the training latents, the reference for the generator's
        if training_data.info.has_latents:
            lat = torch.stack([training_data.get(i)["latents"] for i in range(min(64, len(training_data)))])
            self.data_stats = x0_stats(lat, vcfg.extreme_threshold)

    def maybe_run(self, trainer) -> None:
        n = self.cfg.interval_steps
        if n and trainer.state.step % n == 0:
            self.run(trainer)

    def _noise(self, i: int, purpose: int, device, sub: int = 0) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(sample_seed(self.cfg.seed, i, purpose, sub=sub))
        return torch.randn(self.latent_shape, generator=g, device=device)

    @torch.no_grad()
    def sample(self, module, dtype, device) -> torch.Tensor:
        """``[R, P, C, F, H, W]``: every prompt from each of R noises (noise r of prompt i is keyed by
        (seed, i, r), so noise 0 is the same as before there were several)."""
        out = []
        for r in range(self.cfg.noises_per_prompt):
            out.append(self._sample_one_noise(module, dtype, device, r))
        return torch.stack(out)

    def _sample_one_noise(self, module, dtype, device, r: int) -> torch.Tensor:
        n = self.text.shape[0]
        text = self.text.to(device)
        # noise r of prompt i: start key sub=r, re-noising sub=step + 1000 r (r = 0: the keys of old)
        noise = torch.stack([self._noise(i, PURPOSE_START, device, sub=r) for i in range(n)])

        def renoise(step):
            return torch.stack([self._noise(i, PURPOSE_RENOISE, device, sub=step + 1000 * r) for i in range(n)])

        cond = {key: v.to(device) for key, v in self.conditioning.items()}
        vfn = lambda x, t: predict_velocity(module, x, t, text, dtype, **cond)  # noqa: E731
        return sample_generator(vfn, self.steps, noise, renoise).cpu()

    def run(self, trainer) -> dict[str, torch.Tensor]:
        """Sample with the generator (and the EMA); log from rank 0. Collective."""
        gen = trainer.models.generator.module
        dtype, device = trainer.models.dtype, trainer.device
        results = {"generator": self.sample(gen, dtype, device)}
        if trainer.ema is not None and trainer.ema.started:
            with trainer.ema.applied():
                results["ema"] = self.sample(gen, dtype, device)
        if self.rank == 0:
            self._log(trainer, results)
        return results

    def statistics(self, samples: torch.Tensor) -> dict[str, float]:
        """Diversity and x0 statistics of ``sample``'s output ``[R, P, ...]``."""
        stats = {"diversity": pairwise_diversity(samples.transpose(0, 1))}
        stats.update({f"x0_{k}": v for k, v in x0_stats(samples, self.cfg.extreme_threshold).items()})
        return stats

    def _log(self, trainer, results: dict) -> None:
        step = trainer.state.step
        scalars = {f"validation/data/x0_{k}": v for k, v in (self.data_stats or {}).items()}
        for name, samples in results.items():
            stats = self.statistics(samples)
            scalars.update({f"validation/{name}/{k}": v for k, v in stats.items()})
            log.info("validation %s at step %d: %s", name, step, ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
            latents = samples[0]
            for i, lat in enumerate(latents):
                trainer.writer.image(f"validation/{name}/{i}", latents_to_image(lat), step, caption=self.captions[i])
            if self.cfg.vae_path:
                self._log_decoded(trainer, name, latents, step)
        trainer.writer.scalars(scalars, step)
        trainer.writer.text("validation/prompts", "\n\n".join(self.captions), step)
        log.info("validation at step %d: %d samples logged", step, sum(v[0].shape[0] for v in results.values()))

    def _log_decoded(self, trainer, name: str, latents: torch.Tensor, step: int) -> None:
        from .data.video import decode_latents, frames_grid, load_vae, write_mp4

        if self._vae is None:
            self._vae = load_vae(self.cfg.vae_path, trainer.device)
        videos = decode_latents(self._vae, latents)
        out = self.output_dir / "validation" / f"step-{step:08d}"
        out.mkdir(parents=True, exist_ok=True)
        for i, v in enumerate(videos):
            trainer.writer.image(f"validation/{name}_frames/{i}", frames_grid(v).permute(2, 0, 1).float() / 255, step,
                                 caption=self.captions[i])
            write_mp4(out / f"{name}_{i:02d}.mp4", v)


def build_validator(cfg, plan, data: LatentDataset, steps: list, rank: int):
    """The run's validation hook: the toy problem's quality metrics for the built-in data,
    prompts sampled and logged otherwise; None when validation is off."""
    if not cfg.validation.interval_steps:
        return None
    if plan.builtin_data:
        from .toy.builtin import TOY_SPEC
        from .toy.quality import ToyQuality

        return ToyQuality(TOY_SPEC, cfg.validation.interval_steps, seed=cfg.validation.seed, student_steps=steps)
    return Validator(cfg.validation, steps, plan.latent_shape, plan.text_len or data.info.max_text_len,
                     data, cfg.output_dir, rank)
