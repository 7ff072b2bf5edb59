"""The built-in toy problem as files: the embedded teacher's folder and the toy dataset writer."""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.format import DatasetWriter
from ..io_utils import atomic_dir
from .distribution import ToySpec, class_embeddings, null_embedding, sample

# dmd.regression's pairs for the built-in preset: how many, and the teacher's ODE that makes them
TOY_PAIRS = 512
TOY_PAIR_ODE_STEPS = 16

TOY_SPEC = ToySpec()
NULL_CAPTION = "<null>"


def builtin_teacher_dir() -> Path:
    """The toy teacher that ships inside the package (``megadmd/assets/toy_teacher``)."""
    return Path(__file__).resolve().parent.parent / "assets" / "toy_teacher"


def class_caption(k: int) -> str:
    return f"toy class {k}"


def write_toy_dataset(root: str | Path, num_samples: int, seed: int = 0, spec: ToySpec = TOY_SPEC,
                      shard_size: int = 1024) -> Path:
    """Write ``num_samples`` true-distribution samples as a synthetic-latent dataset.

    Labels cycle through the classes; the null embedding is stored as the negative prompt.
    The folder appears only when complete.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % spec.num_classes
    latents, _ = sample(spec, labels, g)
    emb = class_embeddings(spec)
    with atomic_dir(root) as tmp:
        w = DatasetWriter(tmp, text_dim=spec.text_dim, max_text_len=spec.text_len,
                          shard_size=shard_size, latent_shape=list(spec.latent_shape),
                          extra={"toy": {"spec": spec.__dict__, "seed": seed}, "written_by": "train"})
        for i in range(num_samples):
            k = int(labels[i])
            w.add(emb[k], class_caption(k), latents[i])
        w.finish(null_embedding(spec), NULL_CAPTION)
    return Path(root)


def write_toy_pairs(root: str | Path, teacher_dir: str | Path, num_samples: int, ode_steps: int,
                    guidance_scale: float, cfg_form: str, flow_shift: float, seed: int = 0,
                    spec: ToySpec = TOY_SPEC, batch: int = 256) -> Path:
    """``num_samples`` (noise, latent) pairs of the toy teacher's ODE with CFG, as a dataset with
    noise: what ``megadmd synth --save-noise`` writes for a real teacher (the same noise keys and
    sampler), for dmd.regression on the built-in preset. The folder appears only when complete."""
    from .. import flow
    from ..data.synth import SYNTH_PURPOSE, ode_sample
    from ..models import load_wan
    from ..rng import sample_seed

    teacher = load_wan(teacher_dir).eval()
    labels = torch.arange(num_samples) % spec.num_classes
    text = class_embeddings(spec)[labels]
    null = null_embedding(spec)
    noise = torch.stack([torch.randn(spec.latent_shape, generator=torch.Generator().manual_seed(
        sample_seed(seed, i, SYNTH_PURPOSE))) for i in range(num_samples)])
    sigmas = flow.euler_sigmas(ode_steps, flow_shift)
    latents = torch.cat([ode_sample(teacher, noise[i:i + batch], text[i:i + batch],
                                    null.expand(min(batch, num_samples - i), -1, -1), sigmas, guidance_scale,
                                    cfg_form, torch.float32) for i in range(0, num_samples, batch)])
    with atomic_dir(root) as tmp:
        extra = {"toy": {"spec": spec.__dict__, "seed": seed},
                 "synth": {"teacher": str(teacher_dir), "steps": ode_steps, "guidance_scale": guidance_scale,
                           "cfg_form": cfg_form, "flow_shift": flow_shift, "seed": seed}}
        w = DatasetWriter(tmp, text_dim=spec.text_dim, max_text_len=spec.text_len, shard_size=1024,
                          latent_shape=list(spec.latent_shape), extra=extra, with_noise=True)
        for i in range(num_samples):
            k = int(labels[i])
            w.add(text[i], class_caption(k), latents[i], noise=noise[i])
        w.finish(null, NULL_CAPTION)
    return Path(root)
