"""The built-in toy problem as files: the embedded teacher's folder and the toy dataset writer."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from ..data.format import DatasetWriter
from ..io_utils import atomic_dir, open_safetensors
from .distribution import ToySpec, class_embeddings, null_embedding, sample

# dmd.regression's pairs for the built-in preset: how many, and the teacher's ODE that makes them
TOY_PAIRS = 512
TOY_PAIR_ODE_STEPS = 16

TOY_SPEC = ToySpec()
NULL_CAPTION = "<null>"

log = logging.getLogger("megadmd")


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


def shipped_pairs_path() -> Path:
    """The built-in teacher's regression pairs as shipped (their latents only; ``tools/toy_pairs_asset.py``
    writes them), so that a run need not sample the ODE at start-up."""
    return builtin_teacher_dir().parent / "toy_pairs" / "ode_latents.safetensors"


def pair_recipe(teacher_dir: str | Path, num_samples: int, ode_steps: int, guidance_scale: float, cfg_form: str,
                flow_shift: float, seed: int, spec: ToySpec = TOY_SPEC) -> dict[str, str]:
    """Everything the pairs' latents depend on but the sampler's code, as strings (the shipped
    file's metadata): the teacher by the hash of its config and weights, not by its path."""
    folder = Path(teacher_dir)
    files = [folder / "config.json", folder / "diffusion_pytorch_model.safetensors"]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes() if f.is_file() else b"")
    return {"teacher_sha256": digest.hexdigest() if all(f.is_file() for f in files) else "",
            "num_samples": str(num_samples), "ode_steps": str(ode_steps), "guidance_scale": repr(float(guidance_scale)),
            "cfg_form": cfg_form, "flow_shift": repr(float(flow_shift)), "seed": str(seed),
            "spec": json.dumps(spec.__dict__, sort_keys=True)}


def shipped_pair_latents(recipe: dict[str, str]) -> torch.Tensor | None:
    """The shipped latents if they were sampled with exactly ``recipe``, else None."""
    path = shipped_pairs_path()
    if not recipe["teacher_sha256"] or not path.is_file():
        return None
    with open_safetensors(path, "the shipped toy pairs") as f:
        return f.get_tensor("latents") if f.metadata() == recipe else None


def toy_pair_inputs(num_samples: int, seed: int, spec: ToySpec = TOY_SPEC):
    """(labels, text, null, noise) of the pairs: labels cycle through the classes, and pair i's
    noise is keyed by i as ``megadmd synth`` keys it."""
    from ..data.synth import SYNTH_PURPOSE
    from ..rng import sample_seed

    labels = torch.arange(num_samples) % spec.num_classes
    noise = torch.stack([torch.randn(spec.latent_shape, generator=torch.Generator().manual_seed(
        sample_seed(seed, i, SYNTH_PURPOSE))) for i in range(num_samples)])
    return labels, class_embeddings(spec)[labels], null_embedding(spec), noise


def sample_pair_latents(teacher_dir: str | Path, num_samples: int, ode_steps: int, guidance_scale: float,
                        cfg_form: str, flow_shift: float, seed: int = 0, spec: ToySpec = TOY_SPEC,
                        batch: int = 256) -> torch.Tensor:
    """The teacher's ``ode_steps``-step Euler ODE with CFG from each pair's noise."""
    from .. import flow
    from ..data.synth import ode_sample
    from ..models import load_wan

    teacher = load_wan(teacher_dir).eval()
    _, text, null, noise = toy_pair_inputs(num_samples, seed, spec)
    sigmas = flow.euler_sigmas(ode_steps, flow_shift)
    return torch.cat([ode_sample(teacher, noise[i:i + batch], text[i:i + batch],
                                 null.expand(min(batch, num_samples - i), -1, -1), sigmas, guidance_scale,
                                 cfg_form, torch.float32) for i in range(0, num_samples, batch)])


def write_toy_pairs(root: str | Path, teacher_dir: str | Path, num_samples: int, ode_steps: int,
                    guidance_scale: float, cfg_form: str, flow_shift: float, seed: int = 0,
                    spec: ToySpec = TOY_SPEC) -> Path:
    """``num_samples`` (noise, latent) pairs of the toy teacher's ODE with CFG, as a dataset with
    noise: what ``megadmd synth --save-noise`` writes for a real teacher (the same noise keys and
    sampler), for dmd.regression on the built-in preset. The latents come from the shipped file
    when it was sampled with the same teacher and settings (tests/unit/test_toy_pairs.py
    re-samples some of them), else from the ODE here. The folder appears only when complete."""
    recipe = pair_recipe(teacher_dir, num_samples, ode_steps, guidance_scale, cfg_form, flow_shift, seed, spec)
    latents = shipped_pair_latents(recipe)
    if latents is None:
        log.info("sampling %d (noise, latent) pairs of the teacher's %d-step ODE for dmd.regression into %s",
                 num_samples, ode_steps, root)
        latents = sample_pair_latents(teacher_dir, num_samples, ode_steps, guidance_scale, cfg_form, flow_shift,
                                      seed, spec)
    else:
        log.info("dmd.regression: the %d (noise, latent) pairs of the teacher's %d-step ODE shipped in %s, into %s",
                 num_samples, ode_steps, shipped_pairs_path().parent, root)
    labels, text, null, noise = toy_pair_inputs(num_samples, seed, spec)
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
