"""Conversions: checkpoints to diffusers folders, the EMA export, universal checkpoints, and
plain weights to role initializations.

- ``to_diffusers``: a megadmd checkpoint (or a bare DeepSpeed ZeRO checkpoint folder) -> a diffusers
  ``WanTransformer3DModel`` folder for any trainable role (a two-expert model becomes
  ``transformer`` and ``transformer_2``; ``pipeline_from`` makes a complete pipeline folder), through
  DeepSpeed's zero-to-fp32 code
  (no need for the training world size). The fake score's GAN head is dropped; the generator's
  VSA gates (``attn1.to_gate_compress``) go to their own file, ``vsa_gates.safetensors``, which
  diffusers does not read (so it loads the folder with no unused-weights warning) and megadmd
  loads (``megadmd generate``, ``megadmd.attention.enable_vsa``, a role initialization).
- ``export_ema``: the gathered EMA saved in a checkpoint -> the same kind of folder.
- A generator's folder also records how to sample it (``megadmd_sampling.json``, from the run's
  config); with ``pipeline_from`` its scheduler samples the run's steps (diffusers' own
  ``FlowMatchEulerDiscreteScheduler`` where it can, else a ``DMDScheduler``) and the other
  components are copied, or linked with relative links (megadmd/pipeline/).
- ``to_universal``: DeepSpeed's universal checkpoint, to resume at another world size (resuming
  does this by itself; this is for doing it ahead of time).
- ``init_from_weights``: a safetensors file in diffusers or original Wan key names plus a config ->
  a folder usable as any role's path.

Folders are written under a temporary name and renamed when complete; weights are sharded
safetensors (with an index) above ``max_shard_size``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from .config import TRAINABLE_ROLES, ConfigError
from .io_utils import atomic_dir
from .monitoring.progress import progress
from .safety.finite import check_finite_state
from .safety.folders import check_output

log = logging.getLogger("megadmd")
WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"--dtype must be one of {', '.join(_DTYPES)}, got {name}") from None


def write_diffusers_folder(state: dict, config: dict, out: str | Path, dtype: str = "fp32",
                           max_shard_size: str = "5GB", sampling: Optional[dict] = None,
                           replace: bool = False) -> Path:
    """A diffusers ``WanTransformer3DModel`` folder: config.json plus (sharded) safetensors, the
    VSA gates (if any) in ``vsa_gates.safetensors``, and ``sampling`` as megadmd_sampling.json.
    An existing ``out`` is replaced only with ``replace``."""
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import save_file

    from .models import GATES_FILE, is_gate_key

    cfg = {k: v for k, v in config.items() if k != "_name_or_path"}
    cfg["_class_name"] = "WanTransformer3DModel"
    dt = _dtype(dtype)
    tensors = {}
    with progress(len(state), f"convert: {dtype} tensors for {Path(out).name}", unit="tensors") as bar:
        for k, v in state.items():
            tensors[k] = v.detach().to("cpu", dt if v.is_floating_point() else v.dtype).contiguous()
            bar.update(1)
    gates = {k: tensors.pop(k) for k in [k for k in tensors if is_gate_key(k)]}
    gib = sum(t.numel() * t.element_size() for t in tensors.values()) / 2 ** 30
    log.info("convert: writing %s (%.2f GiB of safetensors)", out, gib)
    with atomic_dir(out, replace=replace) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_torch_state_dict(tensors, tmp, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size)
        if gates:
            save_file(gates, str(tmp / GATES_FILE))
        if sampling is not None:
            from .pipeline.info import write_sampling_info

            write_sampling_info(tmp, sampling)
    return Path(out)


def split_experts(state: dict) -> dict:
    """``{"transformer": state}``, or for a two-expert model ``{"transformer": high, "transformer_2": low}``."""
    if not any(k.startswith("high.") for k in state):
        return {"transformer": state}
    return {"transformer": {k[5:]: v for k, v in state.items() if k.startswith("high.")},
            "transformer_2": {k[4:]: v for k, v in state.items() if k.startswith("low.")}}


def write_role(state: dict, configs: dict, out: str | Path, dtype: str, max_shard_size: str,
               pipeline_from: Optional[str] = None, link: bool = False, sampling: Optional[dict] = None,
               replace: bool = False) -> Path:
    """Write a role's weights: a transformer folder, or a pipeline-style folder.

    ``configs`` maps ``transformer`` (and ``transformer_2``) to config dicts. A two-expert model,
    or any model with ``pipeline_from`` (a diffusers Wan pipeline folder to take the other
    components from), is written as ``out/transformer[_2]``; with ``pipeline_from`` the text
    encoder, tokenizer, VAE (...) are copied from it (``link``: relative symlinks) and its
    ``model_index.json`` copied, so ``WanPipeline.from_pretrained(out)`` loads the distilled model.
    ``sampling`` (a generator's megadmd_sampling.json) goes to the folder's root and, in a
    pipeline, replaces the base scheduler by one on its steps (pipeline/folder.py). An existing
    ``out`` is replaced only with ``replace`` (checked by megadmd.safety.folders.check_output first).
    """
    check_finite_state(state)
    parts = split_experts(state)
    if len(parts) == 1 and pipeline_from is None:
        return write_diffusers_folder(parts["transformer"], configs["transformer"], out, dtype, max_shard_size,
                                      sampling, replace)
    if pipeline_from is not None:
        from .pipeline.folder import read_pipeline_index

        read_pipeline_index(Path(pipeline_from), list(parts))  # a bad base fails before any work
    with atomic_dir(out, replace=replace) as tmp:
        for name, sub in parts.items():
            write_diffusers_folder(sub, configs[name], tmp / name, dtype, max_shard_size)
        if pipeline_from is not None:
            from .pipeline.folder import add_pipeline_components

            add_pipeline_components(Path(pipeline_from), tmp, Path(out), list(parts), link, sampling)
        elif sampling is not None:
            from .pipeline.info import write_sampling_info

            write_sampling_info(tmp, sampling)
    return Path(out)


def _is_megadmd_checkpoint(path: Path) -> bool:
    return (path / "trainer_state.json").is_file()


def role_state_dict(ckpt: str | Path, role: str, config: Optional[str] = None) -> tuple[dict, dict]:
    """(fp32 state dict, model config) of a role in a megadmd checkpoint or a DeepSpeed folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from .checkpoint import DS_TAG, verify
    from .dmd.gan import HEAD_ATTR

    path = Path(ckpt)
    if not path.is_dir():
        raise ConfigError(f"checkpoint folder not found: {path}")
    if _is_megadmd_checkpoint(path):
        if role not in TRAINABLE_ROLES:
            raise ConfigError(f"--role must be one of {', '.join(TRAINABLE_ROLES)} (the teacher is not trained)")
        problem = verify(path, only=(f"{role}/", "trainer_state.json"))
        if problem:
            raise ConfigError(f"checkpoint {problem}")
        ds_dir, tag = path / role, DS_TAG
        model_cfg = _role_configs(path / role)
    else:  # a bare DeepSpeed checkpoint folder (with 'latest' or tag folders)
        if config is None:
            raise ConfigError(f"{path} is a DeepSpeed checkpoint without a model config; pass --config "
                              f"with the model's config.json")
        ds_dir, tag = path, None
        model_cfg = {"transformer": json.loads(Path(config).read_text())}
    log.info("convert: gathering the %s's ZeRO shards from %s", role, path)
    state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    state = {k: v for k, v in state.items() if not k.startswith(f"{HEAD_ATTR}.")}
    return state, model_cfg


def _role_configs(role_dir: Path) -> dict:
    configs = {"transformer": json.loads((role_dir / "config.json").read_text())}
    if (role_dir / "config_2.json").is_file():
        configs["transformer_2"] = json.loads((role_dir / "config_2.json").read_text())
    return configs


def to_diffusers(ckpt: str, out: str, role: str = "generator", dtype: str = "fp32",
                 max_shard_size: str = "5GB", config: Optional[str] = None,
                 pipeline_from: Optional[str] = None, link: bool = False, overwrite: bool = False) -> Path:
    target = check_output(out, "convert to-diffusers", overwrite, inputs=[ckpt, config, pipeline_from])
    state, configs = role_state_dict(ckpt, role, config)
    sampling = None
    if role == "generator" and _is_megadmd_checkpoint(Path(ckpt)):
        from .pipeline.info import checkpoint_sampling_info

        sampling = checkpoint_sampling_info(Path(ckpt), "generator")
    elif pipeline_from is not None:
        log.warning("the pipeline keeps the scheduler of %s: only a megadmd checkpoint's generator records "
                    "its DMD steps", pipeline_from)
    return write_role(state, configs, out, dtype, max_shard_size, pipeline_from, link, sampling, target.replace)


def export_ema(ckpt: str, out: str, dtype: str = "fp32", max_shard_size: str = "5GB",
               pipeline_from: Optional[str] = None, link: bool = False, overwrite: bool = False) -> Path:
    """The generator's EMA weights as a diffusers folder, with how to sample them."""
    from safetensors.torch import load_file

    from .checkpoint import verify
    from .pipeline.info import checkpoint_sampling_info

    target = check_output(out, "export-ema", overwrite, inputs=[ckpt, pipeline_from])
    path = Path(ckpt)
    if not _is_megadmd_checkpoint(path):
        raise ConfigError(f"{path} is not a megadmd checkpoint (no trainer_state.json)")
    ema_file = path / "ema" / "ema.safetensors"
    if not ema_file.is_file():
        raise ConfigError(f"checkpoint {path.name} holds no EMA (train with ema.decay > 0, and past "
                          f"ema.start_step)")
    problem = verify(path, only=("ema/ema.safetensors", "generator/config", "trainer_state.json"))
    if problem:
        raise ConfigError(f"checkpoint {problem}")
    return write_role(load_file(str(ema_file)), _role_configs(path / "generator"), out, dtype, max_shard_size,
                      pipeline_from, link, checkpoint_sampling_info(path, "ema"), target.replace)


def to_universal(ckpt: str) -> list[Path]:
    """Universal copies of every trainable role of a megadmd checkpoint."""
    from .checkpoint import to_universal as convert_role

    path = Path(ckpt)
    if not _is_megadmd_checkpoint(path):
        raise ConfigError(f"{path} is not a megadmd checkpoint (no trainer_state.json)")
    return [convert_role(path / role) for role in TRAINABLE_ROLES]


def init_from_weights(weights: str, config: str, out: str, dtype: str = "fp32",
                      max_shard_size: str = "5GB", overwrite: bool = False) -> Path:
    """Plain weights (diffusers or original Wan key names) + a config -> a role folder.

    ``config`` is a config.json, a diffusers folder holding one, or a preset name.
    """
    from safetensors.torch import load_file

    target = check_output(out, "convert init", overwrite, inputs=[weights, config if Path(config).exists() else None])
    cfg = _load_config(config)
    p = Path(weights)
    if not p.is_file():
        raise ConfigError(f"weights file not found: {p}")
    state = load_file(str(p))
    if "patch_embedding.weight" in state and not any(k.startswith("condition_embedder.") for k in state):
        # original Wan key names (head, text_embedding, ...): use diffusers' own mapping
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

        state = convert_wan_transformer_to_diffusers(state)
    _check_keys(state, cfg)
    check_finite_state(state)
    return write_diffusers_folder(state, cfg, out, dtype, max_shard_size, target.replace)


def _load_config(config: str) -> dict:
    from .presets import PRESETS

    if config in PRESETS and PRESETS[config].wan_config is not None:
        return dict(PRESETS[config].wan_config, _class_name="WanTransformer3DModel")
    p = Path(config)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"--config: no config.json or preset named {config}")
    return json.loads(p.read_text())


def _check_keys(state: dict, cfg: dict) -> None:
    from diffusers import WanTransformer3DModel

    args = {k: v for k, v in cfg.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = WanTransformer3DModel(**args)
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(state))
    if missing:
        raise ConfigError(f"the weights do not fit the config: {len(missing)} keys missing, e.g. {missing[0]}")
