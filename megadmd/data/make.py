"""Dataset makers that need no model: random datasets of any shape (tests and demos)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError
from ..io_utils import atomic_dir
from ..safety.folders import check_output
from .format import DatasetInfo, DatasetWriter


def write_random_dataset(root: str | Path, *, num_samples: int, latent_shape: Optional[list],
                         text_len: int, text_dim: int, seed: int = 0,
                         shard_size: int = 256, with_noise: bool = False, overwrite: bool = False) -> DatasetInfo:
    """Gaussian latents and embeddings with random lengths in [1, text_len]; written atomically.
    ``with_noise``: also a Gaussian "starting noise" per latent (the format of
    ``megadmd synth --save-noise``), from a generator of its own, so the rest stays the same.
    An existing folder is replaced only with ``overwrite`` (megadmd.safety.folders)."""
    if num_samples <= 0:
        raise ConfigError("--num-samples must be positive")
    if text_len <= 0 or text_dim <= 0:
        raise ConfigError("--text-len and --text-dim must be positive")
    target = check_output(root, "make-dataset", overwrite)
    g = torch.Generator().manual_seed(seed)
    g_noise = torch.Generator().manual_seed(seed + 1)
    with atomic_dir(root, replace=target.replace) as tmp:
        w = DatasetWriter(tmp, text_dim=text_dim, max_text_len=text_len, shard_size=shard_size,
                          latent_shape=latent_shape, extra={"written_by": "make-dataset"}, with_noise=with_noise)
        for i in range(num_samples):
            n = int(torch.randint(1, text_len + 1, (1,), generator=g))
            emb = torch.randn(n, text_dim, generator=g)
            lat = torch.randn(*latent_shape, generator=g) if latent_shape is not None else None
            noise = torch.randn(*latent_shape, generator=g_noise) if with_noise else None
            w.add(emb, f"random sample {i}", lat, noise=noise)
        info = w.finish(torch.randn(text_len, text_dim, generator=g), "random negative prompt")
    return info
