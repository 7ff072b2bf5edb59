"""Exporting a LoRA role of a checkpoint (docs/lora.md), two ways:

- ``adapter``: ``pytorch_lora_weights.safetensors``, diffusers' default file name, with peft's key
  names under ``transformer.`` and peft's ``LoraConfig`` (rank, alpha, the adapted layers) as
  safetensors metadata, written by diffusers' own ``WanPipeline.save_lora_weights``; it loads with
  ``pipe.load_lora_weights(folder)``. A two-expert model's low-noise adapter goes to
  ``pytorch_lora_weights_2.safetensors`` (``load_into_transformer_2=True``). The generator's VSA
  gates are full weights, not LoRA, and vanilla diffusers has no place for them: they go to
  ``vsa_gates[_2].safetensors`` beside it (use ``merged`` to ship a VSA model in one folder).
  ``megadmd_lora.json`` says what the folder holds and how to load it.
- ``merged``: the teacher's weights with ``W + alpha / rank * B A`` added in fp32 (and the VSA
  gates), written like any full-weight export (convert.write_role), so ``WanPipeline``,
  ``megadmd generate`` and ``--pipeline-from`` work as for a full-weight run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError
from .adapter import peft_config
from .build import checkpoint_lora

MODES = ("adapter", "merged")
LORA_FILES = {"transformer": "pytorch_lora_weights.safetensors", "transformer_2": "pytorch_lora_weights_2.safetensors"}
GATE_FILES = {"transformer": "vsa_gates.safetensors", "transformer_2": "vsa_gates_2.safetensors"}
INFO = "megadmd_lora.json"


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def merge_adapter(base: dict, adapter: dict, scaling: float) -> dict:
    """``base`` with every adapted weight replaced by ``W + scaling * B A`` (in fp32), plus the
    adapter's other tensors (VSA gates) as they are. Names as in the role's module."""
    merged = dict(base)
    for key, a in adapter.items():
        if key.endswith(".lora_A.weight"):
            layer = key[: -len(".lora_A.weight")]
            b = adapter[f"{layer}.lora_B.weight"]
            merged[f"{layer}.weight"] = base[f"{layer}.weight"].float() + scaling * (b.float() @ a.float())
        elif not is_lora_key(key):
            merged[key] = a
    return merged


def write_lora_role(state: dict, configs: dict, ckpt: str | Path, role: str, mode: Optional[str], out: str | Path,
                    dtype: str, max_shard_size: str, pipeline_from: Optional[str], link: bool = False,
                    sampling: Optional[dict] = None, replace: bool = False) -> Path:
    """A LoRA role's weights (``state``: the role module's state dict, adapter names) -> ``out``,
    which megadmd.safety.folders.check_output has cleared (``replace``: an existing folder may go).
    ``sampling`` (the generator's DMD steps) goes with either export, as with full weights."""
    from ..convert import split_experts, write_role
    from ..safety.finite import check_finite_state

    check_finite_state(state)  # the adapter as trained: a NaN in it is refused before anything is written
    settings = checkpoint_lora(Path(ckpt), role)
    mode = mode or "merged"
    if mode not in MODES:
        raise ConfigError(f"--lora must be one of {', '.join(MODES)}, got '{mode}'")
    scaling = settings["alpha"] / settings["rank"]
    if mode == "adapter":
        if pipeline_from is not None:
            raise ConfigError("--pipeline-from writes a full pipeline; use it with --lora merged")
        return write_adapter(split_experts(state), settings, role, out, dtype, sampling, replace)
    run = json.loads((Path(ckpt) / "config.json").read_text())
    base_path = json.loads((Path(ckpt) / "trainer_state.json").read_text())["model_paths"]["teacher"]
    merged = merge_adapter(_base_state(base_path, run["model"].get("boundary_ratio")), state, scaling)
    return write_role(merged, configs, out, dtype, max_shard_size, pipeline_from, link, sampling, replace)


def _base_state(path: str, boundary_ratio: Optional[float]) -> dict:
    from ..models import load_role_model

    return load_role_model(path, torch.float32, boundary_ratio, what="the LoRA run's teacher (its base)").state_dict()


def write_adapter(parts: dict, settings: dict, role: str, out: str | Path, dtype: str,
                  sampling: Optional[dict] = None, replace: bool = False) -> Path:
    """``parts``: ``{"transformer": state[, "transformer_2": state]}`` in the model's own names.
    ``sampling`` is written as megadmd_sampling.json: the base pipeline's scheduler is not the
    student's, so the folder says which steps to sample on (docs/lora.md)."""
    from diffusers import WanPipeline
    from safetensors.torch import save_file

    from ..convert import _dtype
    from ..io_utils import atomic_dir

    dt = _dtype(dtype)
    info = {"role": role, "rank": settings["rank"], "alpha": settings["alpha"], "files": {}, "vsa_gates": {}}
    with atomic_dir(out, replace=replace) as tmp:
        for name, sub in parts.items():
            adapter = {k: v.to(dt).contiguous() for k, v in sub.items() if is_lora_key(k)}
            gates = {k: v.to(dt).contiguous() for k, v in sub.items() if not is_lora_key(k)}
            layers = sorted({k.rsplit(".lora_", 1)[0] for k in adapter})
            meta = peft_config(settings["rank"], settings["alpha"], layers).to_dict()
            WanPipeline.save_lora_weights(str(tmp), transformer_lora_layers=adapter, weight_name=LORA_FILES[name],
                                          transformer_lora_adapter_metadata=meta)
            info["files"][name] = LORA_FILES[name]
            if gates:
                save_file(gates, str(tmp / GATE_FILES[name]))
                info["vsa_gates"][name] = GATE_FILES[name]
        info["load"] = ("pipe.load_lora_weights(folder); for transformer_2: pipe.load_lora_weights(folder, "
                        f"weight_name='{LORA_FILES['transformer_2']}', load_into_transformer_2=True)")
        (tmp / INFO).write_text(json.dumps(info, indent=1) + "\n")
        if sampling is not None:
            from ..pipeline.info import write_sampling_info

            write_sampling_info(tmp, sampling)
    return Path(out)
