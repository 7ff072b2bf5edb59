"""Completing an exported pipeline folder from a diffusers Wan pipeline (``--pipeline-from``).

The distilled transformer(s) are written by the caller; this adds the base pipeline's other
components (text encoder, tokenizer, VAE, image encoder, ...) and its ``model_index.json``. By
default they are copied, so the folder stands alone: it can be moved, copied to another machine
or uploaded. With ``link`` they are relative symlinks (never absolute), which stay valid as long
as the export and the base pipeline keep their relative places. A generator export replaces the
base scheduler (a many-step sampler with CFG) by a ``DMDScheduler`` on the run's own steps and
writes ``megadmd_sampling.json`` next to it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from ..config import ConfigError


def read_pipeline_index(base: Path, transformers: list) -> dict:
    """The base pipeline's ``model_index.json``, checked to hold every transformer we write."""
    index = base / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"--pipeline-from {base} is not a diffusers pipeline folder (no model_index.json)")
    spec = json.loads(index.read_text())
    missing = [t for t in transformers if t not in spec]
    if missing:
        raise ConfigError(f"--pipeline-from {base} has no {', '.join(missing)} component; use a pipeline of "
                          f"the same kind (two experts need a Wan2.2 pipeline with transformer_2)")
    return spec


def add_pipeline_components(base: Path, tmp: Path, dest: Path, transformers: list, link: bool = False,
                            sampling: Optional[dict] = None) -> None:
    """Fill ``tmp`` (renamed to ``dest`` once complete) with the base pipeline's other components.

    ``sampling`` (the generator's ``megadmd_sampling.json``) replaces the base scheduler by a
    ``DMDScheduler`` on its timesteps; without it the base scheduler is kept.
    """
    from .info import write_sampling_info
    from .scheduler import DMDScheduler

    spec = read_pipeline_index(base, transformers)
    for name, value in spec.items():
        if name.startswith("_") or name in transformers or not isinstance(value, list) or value[0] is None:
            continue
        if name == "scheduler" and sampling is not None:
            continue
        src = base / name
        if not src.exists():
            continue
        if link:
            # relative to the folder holding the link: tmp and dest are siblings, so the same
            # relative path is right once tmp is renamed to dest
            target = os.path.relpath(src.resolve(), dest.parent.resolve() / dest.name)
            (tmp / name).symlink_to(target, target_is_directory=src.is_dir())
        elif src.is_dir():
            shutil.copytree(src, tmp / name)  # follows symlinks (e.g. a Hugging Face cache's blobs)
        else:
            shutil.copy2(src, tmp / name)
    if sampling is not None:
        scheduler = DMDScheduler(timesteps=sampling["timesteps"])
        scheduler.save_pretrained(str(tmp / "scheduler"))
        spec["scheduler"] = [DMDScheduler.__module__, DMDScheduler.__name__]
        write_sampling_info(tmp, sampling)
    (tmp / "model_index.json").write_text(json.dumps(spec, indent=2) + "\n")
