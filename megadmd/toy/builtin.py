"""The built-in toy problem as files: the embedded teacher's folder and the toy dataset writer."""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.format import DatasetWriter
from ..io_utils import atomic_dir
from .distribution import ToySpec, class_embeddings, null_embedding, sample

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
