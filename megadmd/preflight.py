"""Checks of a run's inputs before any process group, model or file is touched for writing.

Everything here reads only small files (model config.json, dataset index.json, DeepSpeed JSON),
so a bad input fails in well under a second with one line naming what to fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import ROLES, ConfigError, RunConfig
from .data.format import DatasetInfo, check_dataset_files, dataset_format, read_index
from .models import check_weight_files, expert_dirs, read_model_config
from .parallel.state import check_layout
from .presets import get_preset
from .roles import role_ds_config


@dataclass
class TrainPlan:
    model_paths: dict  # role -> folder ("" never appears: built-ins are resolved)
    model_config: dict  # the teacher's config.json
    data_path: str
    builtin_data: bool  # the toy dataset is written into the output folder at start-up
    latent_shape: tuple  # [C, F, H, W] the generator produces
    dp_size: int
    role_configs: dict = field(default_factory=dict)  # role -> config.json
    text_len: int = 0  # pad text embeddings to this (0: the dataset's longest); 512 for I2V models
    data_format: str = "megadmd"  # or "fastvideo": a FastVideo parquet dataset read in place
    data_options: dict = field(default_factory=dict)  # FastVideoDataset's options (interop/fastvideo_data.py)
    resume_from: Optional[Path] = None  # the checkpoint to resume from (the newest whose sizes match)
    resume_universal: bool = False  # it was saved at another world size
    # dmd.regression's (noise, latent) pairs (data_path when the training data holds them); None when off
    regression_path: Optional[str] = None
    builtin_regression: bool = False  # the toy teacher's ODE pairs are written at start-up


def resolve_builtin_teacher(cfg: RunConfig) -> str:
    """``model.teacher_path`` with "" replaced by the preset's built-in teacher."""
    if cfg.model.teacher_path:
        return cfg.model.teacher_path
    preset = get_preset(cfg.preset)
    if not preset.builtin:
        raise ConfigError(f"model.teacher_path is required for preset '{cfg.preset}' "
                          f"(a diffusers WanTransformer3DModel or Wan pipeline folder)")
    from .toy.builtin import builtin_teacher_dir

    return str(builtin_teacher_dir())


def check_models(cfg: RunConfig) -> tuple[dict, dict, dict]:
    """Every role's folder exists and holds a Wan DiT compatible with the teacher's."""
    teacher = resolve_builtin_teacher(cfg)
    paths = {}
    configs = {}
    checked: set = set()
    for role in ("teacher", "generator", "fake_score"):  # the teacher first: the others default to it
        own = getattr(cfg.model, f"{role}_path")
        p = own if role != "teacher" and own else teacher  # "" means "same as the teacher"
        paths[role] = p
        configs[role] = read_model_config(p, what=f"{role} model")
        folders = {p: f"{role} model"}
        if cfg.model.boundary_ratio is not None:
            high, low = expert_dirs(p, what=f"{role} model")
            configs[f"{role}:low"] = read_model_config(low, what=f"{role} low-noise expert")
            folders = {high: f"{role} high-noise expert", low: f"{role} low-noise expert"}
        for folder, what in folders.items():
            if str(folder) not in checked:  # the roles often share the teacher's folder
                check_weight_files(folder, what=what)
                checked.add(str(folder))
    ref = configs["teacher"]
    for role in ("generator", "fake_score"):
        for key in ("in_channels", "out_channels", "text_dim", "patch_size"):
            if configs[role].get(key) != ref.get(key):
                raise ConfigError(f"{role} model has {key}={configs[role].get(key)} but the teacher "
                                  f"has {ref.get(key)}; all three roles must share the architecture's I/O")
    return paths, ref, configs


def check_dataset(cfg: RunConfig, model_config: dict, teacher_path: str) -> tuple[str, bool, Optional[DatasetInfo], dict]:
    """The dataset's path, whether it is the built-in one, what it holds, and how to open it."""
    if not cfg.data.path:
        if not get_preset(cfg.preset).builtin:
            raise ConfigError(f"data.path is required for preset '{cfg.preset}' (a megadmd dataset "
                              f"folder from 'megadmd synth' or 'megadmd make-dataset', or a FastVideo "
                              f"preprocessed parquet folder)")
        from .safety.folders import check_toy_data_dir

        check_toy_data_dir(Path(cfg.output_dir) / "data")
        return str(Path(cfg.output_dir) / "data"), True, None, {}
    opened = {"data_format": dataset_format(cfg.data.path, cfg.data.format), "data_options": {}}
    if opened["data_format"] == "fastvideo":
        from .interop.fastvideo_data import fastvideo_options

        info, opened["data_options"] = fastvideo_options(cfg.data, cfg.dmd.simulate_generator_forward,
                                                         teacher_path, cfg.preset)
        # rank 0 reads the parquet footers once at start-up and every rank reads this index
        opened["data_options"]["index_cache"] = Path(cfg.output_dir) / "fastvideo_index.json"
    else:
        for key in ("negative_path", "vae_path"):
            if getattr(cfg.data, key):
                raise ConfigError(f"data.{key} is for FastVideo datasets; megadmd dataset {cfg.data.path} "
                                  f"carries its own negative embedding and normalized latents")
        info = read_index(cfg.data.path)
        check_dataset_files(cfg.data.path, info)
    if not cfg.dmd.simulate_generator_forward and not info.has_latents:
        raise ConfigError(f"dataset {cfg.data.path} holds only text embeddings; set "
                          f"dmd.simulate_generator_forward=true for data-free training or give a "
                          f"dataset with latents")
    check_image_condition(cfg.data.path, info, model_config)
    if info.has_latents and info.latent_shape[0] != model_config.get("out_channels"):
        raise ConfigError(f"dataset {cfg.data.path} has {info.latent_shape[0]}-channel latents but the "
                          f"model predicts {model_config.get('out_channels')} channels (in_channels "
                          f"{model_config.get('in_channels')}); use a dataset made for this model")
    if info.text_dim != model_config.get("text_dim"):
        raise ConfigError(f"dataset {cfg.data.path} has text embeddings of dimension {info.text_dim} "
                          f"but the model's text_dim is {model_config.get('text_dim')}")
    return cfg.data.path, False, info, opened


def check_regression_data(cfg: RunConfig, data_path: str, info: Optional[DatasetInfo],
                          model_config: dict) -> tuple[Optional[str], bool]:
    """Where dmd.regression's pairs come from: (their dataset, whether the run writes the toy
    teacher's pairs itself); (None, False) when the regression is off."""
    r = cfg.dmd.regression
    if not r.weight:
        return None, False
    if not r.data_path and info is None:  # built-in toy data: the run samples the teacher's pairs
        return str(Path(cfg.output_dir) / "regression_data"), True
    path = r.data_path or data_path
    pairs = read_index(path) if r.data_path else info
    if not (pairs.has_latents and pairs.has_noise):
        raise ConfigError(f"dmd.regression.weight > 0 needs (noise, latent) pairs, but dataset {path} holds no "
                          f"starting noise; write one with 'megadmd synth --save-noise' and set dmd.regression.data_path")
    if pairs.text_dim != model_config.get("text_dim"):
        raise ConfigError(f"dmd.regression.data_path {path} has text embeddings of dimension {pairs.text_dim} "
                          f"but the model's text_dim is {model_config.get('text_dim')}")
    check_image_condition(path, pairs, model_config)
    return path, False


def check_image_condition(path: str, info: DatasetInfo, model_config: dict) -> None:
    """Image-to-video models need image-conditioned data, and text-to-video models must not get it."""
    from .data.image import expected_in_channels, is_i2v

    i2v = is_i2v(model_config)
    if i2v and info.image_condition is None:
        raise ConfigError(f"the model is image-to-video (image_dim {model_config.get('image_dim')}) but dataset "
                          f"{path} has no image condition; add one with 'megadmd encode-images'")
    if not i2v and info.image_condition is not None:
        raise ConfigError(f"dataset {path} holds image conditions (image-to-video) but the model is "
                          f"text-to-video; use an I2V teacher or a text-to-video dataset")
    if i2v:
        c = info.image_condition["latent_shape"][0]
        if expected_in_channels(c, True) != model_config.get("in_channels"):
            raise ConfigError(f"dataset {path} has {c}-channel image latents: the model would need in_channels "
                              f"{expected_in_channels(c, True)}, it has {model_config.get('in_channels')}")


def latent_shape_for(cfg: RunConfig, info: Optional[DatasetInfo], model_config: dict) -> tuple:
    if cfg.dmd.simulate_generator_forward and cfg.data.latent_shape:
        shape = tuple(int(x) for x in cfg.data.latent_shape)
    elif info is not None and info.has_latents:
        shape = tuple(info.latent_shape)
    elif info is not None and info.image_condition is not None:  # data-free I2V: the image's shape
        shape = tuple(info.image_condition["latent_shape"])
    elif info is None:  # built-in toy data
        from .toy.builtin import TOY_SPEC

        shape = TOY_SPEC.latent_shape
    else:
        raise ConfigError("data-free training on a text-only dataset needs data.latent_shape "
                          "([C, F, H, W] of the video latent to generate)")
    if len(shape) != 4:
        raise ConfigError(f"data.latent_shape must be [C, F, H, W], got {list(shape)}")
    if shape[0] != model_config.get("out_channels"):
        raise ConfigError(f"data.latent_shape has {shape[0]} channels but the model predicts "
                          f"{model_config.get('out_channels')}")
    pt, ph, pw = model_config.get("patch_size", (1, 2, 2))
    if shape[1] % pt or shape[2] % ph or shape[3] % pw:
        raise ConfigError(f"latent shape {list(shape)} does not divide by the patch size "
                          f"{[pt, ph, pw]}")
    return shape


def check_backend(backend: str) -> None:
    import torch

    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend=nccl needs CUDA GPUs and this machine has none; use "
                          "parallel.backend=auto (gloo on CPU) or gloo")


def check_vsa_backend(name: str) -> None:
    import torch

    from .attention.vsa import resolve_vsa_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolve_vsa_backend(name, device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"attention.vsa_backend: {exc}") from exc


def check_logging_backends(backends: list) -> None:
    """An optional tracking backend must be installed before the run starts."""
    if "wandb" in backends:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("logging.backends lists wandb but the wandb package is not installed; "
                              "pip install 'megadmd[wandb]' (or drop wandb from logging.backends)")


def preflight_train(cfg: RunConfig, world_size: int, overwrite: bool = False) -> TrainPlan:
    """All checks of ``megadmd train``'s inputs and output folder; returns what the run will use.
    ``overwrite``: a non-empty folder that is not a run may take the run (nothing is deleted)."""
    from .safety.runfolder import check_resume_config, plan_resume

    check_backend(cfg.parallel.backend)
    resume_plan = plan_resume(cfg, overwrite)
    paths, model_config, role_configs = check_models(cfg)
    dp = check_layout(world_size, cfg.parallel.sp_size, model_config.get("num_attention_heads"))
    data_path, builtin, info, opened = check_dataset(cfg, model_config, paths["teacher"])
    if cfg.dmd.gan.enabled and info is not None and not info.has_latents:
        raise ConfigError(f"dmd.gan.enabled needs real latents, but dataset {data_path} holds only text "
                          f"embeddings; give a dataset with latents or turn the GAN term off")
    if cfg.dmd.gan.enabled and cfg.dmd.gan.block_index is not None:
        n = model_config.get("num_layers", 0)
        if not -n <= cfg.dmd.gan.block_index < n:
            raise ConfigError(f"dmd.gan.block_index={cfg.dmd.gan.block_index} is out of range for a "
                              f"fake score with {n} blocks")
    shape = latent_shape_for(cfg, info, model_config)
    if cfg.model.lora.enabled:  # megadmd/lora: the targets exist in the teacher's architecture
        from .lora.build import check_lora_targets

        check_lora_targets(cfg.model.lora, model_config, cfg.model.boundary_ratio)
    regression_path, builtin_regression = check_regression_data(cfg, data_path, info, model_config)
    if regression_path and cfg.dmd.regression.data_path and tuple(read_index(regression_path).latent_shape) != tuple(shape):
        raise ConfigError(f"dmd.regression.data_path {regression_path} has latents of shape "
                          f"{read_index(regression_path).latent_shape}, the generator makes {list(shape)}")
    import torch

    bf16 = cfg.model.precision == "bf16" or (cfg.model.precision == "auto" and torch.cuda.is_available())
    for role in ROLES:  # a user's full DeepSpeed JSON must agree with the config (roles.py)
        role_ds_config(role, cfg.deepspeed, cfg.train, cfg.optim, dp, bf16)
    if cfg.attention.vsa_enabled:
        check_vsa_backend(cfg.attention.vsa_backend)
    check_logging_backends(cfg.logging.active_backends)
    resume = resume_plan.candidates[0] if resume_plan.candidates else None
    if resume is not None:
        check_resume_config(cfg, resume, dp)
    text_len = cfg.data.text_len
    if model_config.get("image_dim") is not None:
        # diffusers' Wan I2V attention takes the last 512 context tokens as text, the rest as image
        if text_len not in (0, 512):
            raise ConfigError(f"data.text_len must be 512 for an image-to-video model, got {text_len}")
        text_len = 512
    return TrainPlan(model_paths=paths, model_config=model_config, data_path=data_path, text_len=text_len,
                     builtin_data=builtin, latent_shape=shape, dp_size=dp, role_configs=role_configs,
                     resume_from=resume, regression_path=regression_path, builtin_regression=builtin_regression,
                     **opened)
