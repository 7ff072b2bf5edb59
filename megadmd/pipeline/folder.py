"""Completing an exported pipeline folder from a diffusers Wan pipeline (``--pipeline-from``).

The distilled transformer(s) are written by the caller; this adds the base pipeline's other
components (text encoder, tokenizer, VAE, image encoder, ...) and its ``model_index.json``. By
default they are copied, so the folder stands alone: it can be moved, copied to another machine
or uploaded. With ``link`` they are relative symlinks (never absolute), which stay valid as long
as the export and the base pipeline keep their relative places. A generator export replaces the
base scheduler (a many-step sampler with CFG) by one on the run's own steps and writes
``megadmd_sampling.json`` next to it: diffusers' own ``FlowMatchEulerDiscreteScheduler`` with
stochastic sampling where it can hold those steps (megadmd/pipeline/stock.py; every list our
presets make can), so the folder loads with diffusers alone; else megadmd's ``DMDScheduler``,
which loads only after ``import megadmd.pipeline``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from ..config import ConfigError

log = logging.getLogger("megadmd")


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

    ``sampling`` (the generator's ``megadmd_sampling.json``) replaces the base scheduler by one on
    its timesteps (``export_scheduler``); without it the base scheduler is kept.
    """
    from .info import write_sampling_info

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
        scheduler, record = export_scheduler(sampling["timesteps"])
        scheduler.save_pretrained(str(tmp / "scheduler"))
        spec["scheduler"] = [record["library"], record["class_name"]]
        write_sampling_info(tmp, {**sampling, "scheduler": record})
    (tmp / "model_index.json").write_text(json.dumps(spec, indent=2) + "\n")


def export_scheduler(timesteps: list) -> tuple:
    """The scheduler an export ships for ``timesteps``, and its record for megadmd_sampling.json:
    the stock ``FlowMatchEulerDiscreteScheduler`` when it samples exactly these steps, else a
    ``DMDScheduler`` (logged, with why)."""
    from .scheduler import DMDScheduler
    from .stock import STOCK_CLASS, fit_stock_scheduler, stock_scheduler

    config, why = fit_stock_scheduler(timesteps)
    if config is not None:
        return stock_scheduler(config), {"library": "diffusers", "class_name": STOCK_CLASS}
    log.warning("the export's scheduler is megadmd's DMDScheduler, so loading it needs `import megadmd.pipeline` "
                "first: diffusers' %s cannot sample the steps %s (%s)", STOCK_CLASS, list(timesteps), why)
    return DMDScheduler(timesteps=timesteps), {"library": DMDScheduler.__module__, "class_name": DMDScheduler.__name__,
                                               "why_not_stock": why}
