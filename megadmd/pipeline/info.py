"""``megadmd_sampling.json``: how an exported generator samples, taken from its training run.

Written at the root of every folder ``megadmd convert to-diffusers`` (generator role) and
``megadmd export-ema`` write; ``megadmd generate`` and ``megadmd.attention.enable_vsa`` read their
defaults from it. It records:

- ``timesteps``: the sampler's steps, ``dmd.denoising_steps`` warped through the shifted
  schedule when training warped them (``dmd.warp_denoising_step``), exactly as the trainer does,
  and their number ``num_inference_steps``, which the pipeline must be called with;
- ``scheduler`` (pipeline exports): the class the folder's ``scheduler/`` holds, ``library`` and
  ``class_name`` as in ``model_index.json``: diffusers' ``FlowMatchEulerDiscreteScheduler``, or
  ``DMDScheduler`` with ``why_not_stock``;
- ``guidance_scale`` 1 (DMD samples without CFG) and, under ``training``, the guidance, shift and
  step list the run trained with;
- ``attention``: ``vsa`` with the VSA sparsity the generator trained at when the checkpoint was
  written (the ramp's value at that step), or ``dense``;
- where the weights came from (``weights``: ema or generator; ``step``).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from .. import flow
from ..config import AttentionConfig, ConfigError, DMDConfig

SAMPLING_FILE = "megadmd_sampling.json"
FORMAT_VERSION = 1


def sampling_info(run_config: dict, step: int, weights: str) -> dict:
    """The metadata of a generator trained with ``run_config`` (a resolved config as saved in a
    checkpoint) up to iteration ``step``."""
    from ..attention.processor import vsa_sparsity_at

    d = {**asdict(DMDConfig()), **run_config.get("dmd", {})}
    a = {**asdict(AttentionConfig()), **run_config.get("attention", {})}
    steps = [float(s) for s in d["denoising_steps"]]
    timesteps = flow.warp_steps(steps, d["flow_shift"]) if d["warp_denoising_step"] else steps
    sparsity = 0.0
    if a["vsa_sparsity"] > 0:
        sparsity = vsa_sparsity_at(step, a["vsa_sparsity"], a["vsa_decay_rate"], a["vsa_decay_interval_steps"])
    return {
        "format_version": FORMAT_VERSION,
        "timesteps": timesteps,
        "num_inference_steps": len(timesteps),
        "guidance_scale": 1.0,
        "attention": {"kind": "vsa" if sparsity > 0 else "dense", "vsa_sparsity": sparsity},
        "training": {"denoising_steps": steps, "warp_denoising_step": d["warp_denoising_step"],
                     "flow_shift": d["flow_shift"], "guidance_scale": d["guidance_scale"],
                     "cfg_form": d["cfg_form"], "guidance_interval": list(d["guidance_interval"]),
                     "vsa_sparsity_target": a["vsa_sparsity"]},
        "weights": weights,
        "step": step,
    }


def checkpoint_sampling_info(ckpt: Path, weights: str) -> dict:
    """``sampling_info`` of a megadmd checkpoint folder (its config.json and trainer_state.json)."""
    from ..checkpoint import read_state

    run_config = json.loads((ckpt / "config.json").read_text())
    return sampling_info(run_config, int(read_state(ckpt).get("step", 0)), weights)


def write_sampling_info(folder: Path, info: dict) -> None:
    """Into a folder being built (the caller renames it into place)."""
    (Path(folder) / SAMPLING_FILE).write_text(json.dumps(info, indent=2) + "\n")


def read_sampling_info(model: str | Path) -> Optional[dict]:
    """The metadata of a model folder, or None. ``model`` is an export's root, or its
    ``transformer`` subfolder (the metadata sits at the pipeline root)."""
    from .scheduler import check_timesteps

    root = Path(model)
    candidates = [root / SAMPLING_FILE]
    if (root.parent / "model_index.json").is_file():
        candidates.append(root.parent / SAMPLING_FILE)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return None
    try:
        info = json.loads(path.read_text())
        check_timesteps(info["timesteps"])
        float(info["attention"]["vsa_sparsity"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} is not a valid megadmd sampling file ({exc}); re-export the model") from None
    return info
