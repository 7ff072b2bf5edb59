"""Build the three roles: load each model, fill its DeepSpeed config, initialize its engine.

- ``generator`` and ``fake_score``: trainable, each with its own AdamW, LR schedule and ZeRO-3
  ``deepspeed.initialize``.
- ``teacher``: frozen (no grads, ``eval()``), ZeRO-3 inference through ``deepspeed.initialize``
  without an optimizer.

The same ``mpu`` (our ParallelState) goes to every ``deepspeed.initialize``: DeepSpeed keeps the
first one process-wide, so a role built without it would partition over the wrong group.
Rule from deepspeed-notes.md: a role's engine is *called* (``engine(x)``) only inside that role's
own training step; inside another role's loss we call ``engine.module`` under no_grad.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .config import ROLES, ConfigError, DeepSpeedConfig, OptimConfig, OptimTree, TrainConfig
from .models import WanExperts, load_role_model

log = logging.getLogger("megadmd")

# Keys our config owns. A DeepSpeed template that sets any of them is an error, so there is one
# source of truth for batch size, precision and clipping.
OWNED_DS_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "bf16", "fp16", "gradient_clipping", "optimizer", "scheduler",
)


def ds_configs_dir() -> Path:
    """``ds_configs/`` of a source checkout, or the copy a wheel installs under ``share/``."""
    import sys

    here = Path(__file__).resolve().parent.parent / "ds_configs"
    if here.is_dir():
        return here
    return Path(sys.prefix) / "share" / "megadmd" / "ds_configs"


def load_ds_template(name_or_path: str, key: str) -> dict:
    p = Path(name_or_path)
    if not p.suffix:
        p = ds_configs_dir() / f"{name_or_path}.json"
    if not p.is_file():
        raise ConfigError(f"{key}: DeepSpeed config '{name_or_path}' not found (looked at {p})")
    try:
        tpl = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{key}: DeepSpeed config {p} is not valid JSON: {exc}") from exc
    owned = [k for k in OWNED_DS_KEYS if k in tpl]
    if owned:
        raise ConfigError(
            f"{key}: DeepSpeed config {p} sets {', '.join(owned)}; megadmd's config owns these "
            f"(train.micro_batch_size, train.grad_accum_steps, model.precision, "
            f"train.max_grad_norm), remove them from the template"
        )
    stage = tpl.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"{key}: DeepSpeed config {p} must use ZeRO stage 3, got {stage}")
    if tpl["zero_optimization"].get("reduce_scatter", True) is False:
        # Without reduce-scatter DeepSpeed scales gradients by sp (DeepSpeed #5248).
        raise ConfigError(f"{key}: DeepSpeed config {p} sets reduce_scatter false, which gives "
                          f"wrong gradient scale with sequence parallelism; remove it")
    return tpl


def fill_ds_config(template: dict, train: TrainConfig, dp_size: int, bf16: bool, trainable: bool,
                   load_universal: bool = False) -> dict:
    cfg = json.loads(json.dumps(template))
    if load_universal:  # resuming a checkpoint saved at another world size
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    cfg["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    cfg["gradient_accumulation_steps"] = train.grad_accum_steps
    cfg["train_batch_size"] = train.micro_batch_size * train.grad_accum_steps * dp_size
    cfg["bf16"] = {"enabled": bool(bf16)}
    if trainable and train.max_grad_norm > 0:
        cfg["gradient_clipping"] = float(train.max_grad_norm)
    cfg.setdefault("steps_per_print", 1 << 30)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def lr_lambda(opt: OptimConfig, total_steps: int):
    """Multiplier of the base LR at optimizer step ``n``: linear warmup, then constant, cosine
    or linear decay to ``min_lr_ratio`` at ``total_steps``."""
    warm = opt.warmup_steps
    floor = opt.min_lr_ratio
    total = max(total_steps, 1)

    def f(n: int) -> float:
        if warm > 0 and n < warm:
            return (n + 1) / warm
        if opt.scheduler == "constant":
            return 1.0
        progress = min(max(n - warm, 0) / max(total - warm, 1), 1.0)
        if opt.scheduler == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)  # linear

    return f


@dataclass
class Models:
    """The three engines, by name. Code says ``models.generator``, never ``engines[0]``."""

    generator: Any
    fake_score: Any
    teacher: Any
    dtype: torch.dtype
    paths: dict

    def engine(self, role: str):
        return getattr(self, role)


def optimizer_steps_total(role: str, max_steps: int, generator_update_interval: int) -> int:
    """How many times a role's optimizer steps in a run (the LR schedule's length)."""
    if role == "generator":
        return max_steps // generator_update_interval
    return max_steps


def param_groups(module: torch.nn.Module, own_groups: Optional[dict] = None) -> list[dict]:
    """Optimizer groups: one per expert of a two-expert model (so an update can skip the expert
    that did not run), plus everything else; ``own_groups`` maps a parameter-name prefix to the
    options of a group of its own, placed last (the GAN head: ``{"gan_head.": {"lr": ..., "betas":
    ...}}``), so group 0 stays the model's and ``engine.get_lr()[0]`` its learning rate."""
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    own = []
    for prefix, options in (own_groups or {}).items():
        mine = [p for n, p in trainable if n.startswith(prefix)]
        if mine:
            own.append({"params": mine, "name": prefix.rstrip("."), **options})
        trainable = [(n, p) for n, p in trainable if not n.startswith(prefix)]
    if not isinstance(module, WanExperts):
        return [{"params": [p for _, p in trainable], "name": "all"}] + own
    groups = [{"params": [p for n, p in trainable if n.startswith(f"{name}.")], "name": name}
              for name in ("high", "low")]
    rest = [p for n, p in trainable if not n.startswith(("high.", "low."))]
    if rest:
        groups.append({"params": rest, "name": "other"})
    return groups + own


def restrict_step_to_used_experts(engine) -> None:
    """Before an engine step: give the expert that did not run in this update a zero learning
    rate, so its parameters (and, through AdamW's decoupled decay, its weights) stay exactly as
    they are. Its Adam moments still decay by beta that step. The LR scheduler restores every
    group's rate when it steps. A no-op for one-expert models and between accumulation steps."""
    module = engine.module
    if not isinstance(module, WanExperts) or not engine.is_gradient_accumulation_boundary():
        return
    for group in engine.optimizer.param_groups:
        if group.get("name") in ("high", "low") and group["name"] not in module.used:
            group["lr"] = 0.0
    module.used.clear()


def build_models(paths: dict, optim: OptimTree, train: TrainConfig, ds: DeepSpeedConfig,
                 pstate, device: torch.device, dtype: torch.dtype, generator_update_interval: int,
                 prepare_module: Optional[Any] = None, load_universal: bool = False,
                 boundary_ratio: Optional[float] = None, own_groups: Optional[dict] = None) -> Models:
    """Load and wrap all three roles from ``paths[role]``. Collective: every rank calls it.

    ``prepare_module(role, module)`` runs on each loaded module before DeepSpeed wraps it (to install
    attention processors, activation checkpointing, extra parameters); ``own_groups[role]`` gives
    parameters of that role optimizer groups of their own (``param_groups``).
    """
    import deepspeed

    engines: dict[str, Any] = {}
    for role in ROLES:
        trainable = role != "teacher"
        path = paths[role]
        # Every role loads at the compute dtype: ZeRO-3 makes the trainable roles' fp32 masters from
        # the bf16 shards anyway, so an fp32 load would only double the host memory each rank needs
        # while the full model sits unpartitioned (56 GB instead of 28 GB for a 14B model).
        module = load_role_model(path, dtype, boundary_ratio, what=f"{role} model")
        if prepare_module is not None:
            prepare_module(role, module)
        ds_cfg = fill_ds_config(load_ds_template(getattr(ds, role), f"deepspeed.{role}"), train,
                                pstate.dp_size, bf16=dtype == torch.bfloat16, trainable=trainable,
                                load_universal=load_universal and trainable)
        for sub in module.modules():  # buffers (RoPE tables) go to the device; zero.Init places the params
            for key, buf in sub._buffers.items():
                if buf is not None:
                    sub._buffers[key] = buf.to(device)
        if trainable and dtype != torch.float32:
            # Compute copy in bf16 (the optimizer keeps fp32 masters), as DeepSpeed's engine would
            # cast it; it must happen before zero.Init, which partitions the tensors as they are.
            module.to(dtype)
        # Partition over all dp x sp ranks. Left to deepspeed.initialize, a module that was not
        # built under zero.Init is partitioned over mpu.get_data_parallel_group() only: with sp > 1
        # the sp ranks would then neither share shards nor reduce gradients with each other.
        deepspeed.zero.Init(module=module, data_parallel_group=pstate.get_sequence_data_parallel_group(),
                            config_dict_or_path=ds_cfg, dtype=dtype, mpu=pstate)
        if trainable:
            module.train()
            o: OptimConfig = getattr(optim, role)
            opt = torch.optim.AdamW(param_groups(module, (own_groups or {}).get(role)), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                    eps=o.eps)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lr_lambda(o, optimizer_steps_total(role, train.max_steps, generator_update_interval)))
            engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched,
                                                   config=ds_cfg, mpu=pstate)
        else:
            module.requires_grad_(False)
            module.eval()
            engine, _, _, _ = deepspeed.initialize(model=module, config=ds_cfg, mpu=pstate)
            engine.eval()
        engines[role] = engine
        log.info("%s: %s (%.2fM parameters)", role, path,
                 sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()) / 1e6)
    return Models(generator=engines["generator"], fake_score=engines["fake_score"],
                  teacher=engines["teacher"], dtype=dtype, paths=dict(paths))
