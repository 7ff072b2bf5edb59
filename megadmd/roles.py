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

from .config import ROLES, ConfigError, DeepSpeedConfig, LoRAConfig, OptimConfig, OptimTree, TrainConfig
from .interop.deepspeed_json import merge_ds_config
from .models import is_two_expert, load_role_model
from .zero import block_classes

log = logging.getLogger("megadmd")


def ds_configs_dir() -> Path:
    """``ds_configs/`` of a source checkout, or the copy a wheel installs under ``share/``."""
    import sys

    here = Path(__file__).resolve().parent.parent / "ds_configs"
    if here.is_dir():
        return here
    return Path(sys.prefix) / "share" / "megadmd" / "ds_configs"


def ds_template_path(name_or_path: str) -> Path:
    """A name in ``ds_configs/`` (no suffix) or a path to a JSON file."""
    p = Path(name_or_path)
    return ds_configs_dir() / f"{name_or_path}.json" if not p.suffix else p


def load_ds_template(name_or_path: str, key: str) -> dict:
    """A DeepSpeed JSON: one of ``ds_configs/`` or the user's own, full or partial. The keys
    megadmd owns are checked against its config when filled (interop/deepspeed_json.py)."""
    p = ds_template_path(name_or_path)
    if not p.is_file():
        raise ConfigError(f"{key}: DeepSpeed config '{name_or_path}' not found (looked at {p})")
    try:
        tpl = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{key}: DeepSpeed config {p} is not valid JSON: {exc}") from exc
    if not isinstance(tpl, dict):
        raise ConfigError(f"{key}: DeepSpeed config {p} must hold a JSON object")
    zero = tpl.get("zero_optimization")
    stage = zero.get("stage") if isinstance(zero, dict) else zero
    if stage != 3:
        raise ConfigError(f"{key}: DeepSpeed config {p} must use ZeRO stage 3 (zero_optimization.stage), got {stage}")
    if zero.get("reduce_scatter", True) is False:
        # Without reduce-scatter DeepSpeed scales gradients by sp (DeepSpeed #5248).
        raise ConfigError(f"{key}: DeepSpeed config {p} sets reduce_scatter false, which gives "
                          f"wrong gradient scale with sequence parallelism; remove it")
    return tpl


def fill_ds_config(template: dict, train: TrainConfig, dp_size: int, bf16: bool, trainable: bool,
                   load_universal: bool = False, optim: Optional[OptimConfig] = None,
                   key: str = "deepspeed", source: str = "template", role: str = "") -> dict:
    """The JSON ``deepspeed.initialize`` gets: the template with megadmd's batch sizes, precision,
    clipping (and, for a trainable role, its optimizer settings) checked and filled in."""
    cfg = merge_ds_config(json.loads(json.dumps(template)), source=source, key=key,
                          micro_batch=train.micro_batch_size, grad_accum=train.grad_accum_steps,
                          dp_size=dp_size, bf16=bf16, max_grad_norm=train.max_grad_norm, trainable=trainable,
                          optim=optim if trainable else None, role=role)
    if load_universal:  # resuming a checkpoint saved at another world size
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    cfg.setdefault("steps_per_print", 1 << 30)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def role_ds_config(role: str, ds: DeepSpeedConfig, train: TrainConfig, optim: OptimTree, dp_size: int,
                   bf16: bool, load_universal: bool = False) -> dict:
    """Role ``role``'s DeepSpeed JSON, loaded from ``deepspeed.<role>`` and filled."""
    name, key = getattr(ds, role), f"deepspeed.{role}"
    trainable = role != "teacher"
    return fill_ds_config(load_ds_template(name, key), train, dp_size, bf16, trainable,
                          load_universal=load_universal and trainable,
                          optim=getattr(optim, role) if trainable else None, key=key,
                          source=str(ds_template_path(name)), role=role)


# --- learning-rate schedules ----------------------------------------------------------------
# Names are diffusers' ``get_scheduler`` names (whatever the installed diffusers offers), built by
# diffusers itself; our own lambda only where diffusers has no equivalent:
# - ``cosine_with_min_lr``: FastVideo's max(min_lr_ratio, cos) (diffusers has none; transformers'
#   scheduler of that name is floor + (1 - floor) cos instead, our ``cosine`` with a floor);
# - ``cosine`` with ``min_lr_ratio > 0``: floor + (1 - floor) cos, megadmd's ``cosine`` since its
#   first version (with floor 0 it is diffusers' cosine exactly, and built by it).
# ``constant`` with ``warmup_steps > 0`` is ``constant_with_warmup``, as megadmd's ``constant``
# always was (diffusers' ``constant`` ignores a warm-up). Every schedule counts *iterations*, as
# FastVideo's legacy trainer does (it steps both schedulers every iteration): the generator,
# updated every ``generator_update_interval``-th iteration, takes the value of the iteration it
# updates in, so warm-up and decay lengths are iterations (``train.max_steps``) for both roles.
OWN_SCHEDULES = ("cosine_with_min_lr",)
FLOOR_SCHEDULES = ("cosine", "linear", "cosine_with_min_lr")  # the ones min_lr_ratio shapes


def scheduler_names() -> tuple:
    from diffusers.optimization import SchedulerType

    return tuple(sorted({t.value for t in SchedulerType} | set(OWN_SCHEDULES)))


def check_schedule(o: OptimConfig, key: str) -> None:
    """One line naming what to fix in ``optim.<role>``'s schedule settings."""
    names = scheduler_names()
    if o.scheduler not in names:
        raise ConfigError(f"{key}.scheduler must be one of {', '.join(names)}; got '{o.scheduler}'")
    if o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"{key}: warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
    if o.min_lr_ratio > 0 and o.scheduler not in FLOOR_SCHEDULES:
        raise ConfigError(f"{key}.min_lr_ratio={o.min_lr_ratio} has no effect with scheduler '{o.scheduler}' "
                          f"(only {', '.join(FLOOR_SCHEDULES)} use it); remove it")
    if o.scheduler == "piecewise_constant":
        if not o.step_rules:
            raise ConfigError(f"{key}.step_rules is required by scheduler 'piecewise_constant' "
                              f"(diffusers' form, in iterations: e.g. '1:1000,0.1:2000,0.01')")
        if o.warmup_steps:
            raise ConfigError(f"{key}.warmup_steps has no effect with scheduler 'piecewise_constant'; remove it")
    elif o.step_rules:
        raise ConfigError(f"{key}.step_rules is used by scheduler 'piecewise_constant' only; remove it")
    if o.num_cycles <= 0 or o.power <= 0:
        raise ConfigError(f"{key}: num_cycles and power must be positive")


def schedule_fn(o: OptimConfig, total_iterations: int):
    """The LR multiplier ``f(i)`` of 0-based iteration ``i`` (``i = step - 1``), as diffusers'
    schedulers define it over ``total_iterations``."""
    warm, floor, total = o.warmup_steps, o.min_lr_ratio, max(total_iterations, 1)
    if o.scheduler == "cosine_with_min_lr":
        def f(i: int) -> float:  # FastVideo's: linear warm-up from 0, then max(floor, half cosine)
            if i < warm:
                return i / max(1, warm)
            progress = (i - warm) / max(1, total - warm)
            return max(floor, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return f
    if o.scheduler == "cosine" and floor > 0:
        def g(i: int) -> float:  # megadmd's cosine with a floor: floor + (1 - floor) * half cosine
            if i < warm:
                return i / max(1, warm)
            progress = min((i - warm) / max(1, total - warm), 1.0)
            return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return g
    from diffusers.optimization import get_linear_schedule_with_warmup, get_scheduler

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=o.lr)  # polynomial reads the base lr
    if o.scheduler == "linear":  # diffusers' linear decays to f_min; get_scheduler does not pass it
        sched = get_linear_schedule_with_warmup(dummy, warm, total, f_min=floor)
    else:
        name = "constant_with_warmup" if o.scheduler == "constant" and warm > 0 else o.scheduler
        sched = get_scheduler(name, dummy, step_rules=o.step_rules or None, num_warmup_steps=warm,
                              num_training_steps=total, num_cycles=int(o.num_cycles), power=o.power)
    return sched.lr_lambdas[0]


def update_iteration(n: int, update_interval: int) -> int:
    """The 0-based iteration of a role's 0-based optimizer update ``n``: the generator updates at
    iterations I, 2I, ... (``step % I == 0``), the fake score (I = 1) at every iteration."""
    return (n + 1) * update_interval - 1


def lr_scheduler(optimizer, o: OptimConfig, max_steps: int, update_interval: int):
    """A LambdaLR that DeepSpeed steps once per optimizer update, valued by the iteration the
    update happens in. A checkpoint's scheduler state is its update count, so runs saved before
    schedules counted iterations resume at the right place (the warm-up now counts iterations)."""
    f = schedule_fn(o, max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: f(update_iteration(n, update_interval)))


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
    if not is_two_expert(module):
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
    they are, and a zero gradient: ZeRO-3 would otherwise step it with its last gradient, which
    would count in the global norm (the clipping of the expert that ran) and in its Adam moments.
    Its moments only decay by beta that step. The LR scheduler restores every group's rate when
    it steps. A no-op for one-expert models and between accumulation steps."""
    from .zero import zero_gradient_partitions

    module = engine.module
    if not is_two_expert(module) or not engine.is_gradient_accumulation_boundary():
        return
    idle = [name for name in ("high", "low") if name not in module.used]
    for group in engine.optimizer.param_groups:
        if group.get("name") in idle:
            group["lr"] = 0.0
    for name in idle:
        zero_gradient_partitions(engine, getattr(module, name).parameters())
    module.used.clear()


def recover_from_skipped_step(engine) -> None:
    """After a step DeepSpeed skipped (non-finite gradients), undo what the skip leaves behind:
    the non-finite gradient partitions of parameters the next update may not touch (zero.py),
    and the rates ``restrict_step_to_used_experts`` zeroed, which the LR scheduler's step would
    have restored but a skipped step does not step it (an expert would stay frozen)."""
    from .zero import zero_gradient_partitions

    zero_gradient_partitions(engine)
    sched = engine.lr_scheduler
    if sched is None:
        return
    for group, lr in zip(engine.optimizer.param_groups, sched.get_last_lr()):
        group["lr"] = lr


def add_leaf_blocks(ds_cfg: dict, module: torch.nn.Module) -> None:
    """Make ``module``'s transformer blocks ZeRO-3 leaf modules in ``ds_cfg`` (beside any leaf
    classes the user's JSON names)."""
    leaf = ds_cfg["zero_optimization"].setdefault("leaf_module", {})
    classes = leaf.get("classes", [])
    leaf["classes"] = list(dict.fromkeys([*([classes] if isinstance(classes, str) else classes),
                                          *block_classes(module)]))


def build_models(paths: dict, optim: OptimTree, train: TrainConfig, ds: DeepSpeedConfig,
                 pstate, device: torch.device, dtype: torch.dtype, generator_update_interval: int,
                 prepare_module: Optional[Any] = None, load_universal: bool = False,
                 boundary_ratio: Optional[float] = None, lora: Optional[LoRAConfig] = None,
                 own_groups: Optional[dict] = None, leaf_roles: tuple = ()) -> Models:
    """Load and wrap all three roles from ``paths[role]``. Collective: every rank calls it.

    ``prepare_module(role, module)`` runs on each loaded module before DeepSpeed wraps it (to install
    attention processors, activation checkpointing, extra parameters); ``own_groups[role]`` gives
    parameters of that role optimizer groups of their own (``param_groups``). With ``lora`` enabled,
    its roles are adapters over the teacher's module (megadmd/lora), so the teacher is built first.
    The roles in ``leaf_roles`` fetch each transformer block as one unit (``zero.leaf_block_roles``).
    """
    import deepspeed

    engines: dict[str, Any] = {}
    lora_roles = tuple(lora.roles) if lora is not None and lora.enabled else ()
    for role in (("teacher", "generator", "fake_score") if lora_roles else ROLES):
        trainable = role != "teacher"
        path = paths[role]
        if role in lora_roles:  # megadmd/lora: the role's module holds its adapter, the base is the teacher's
            from .lora.build import build_lora_role

            module = build_lora_role(role, engines["teacher"], lora, seed=train.seed)
        else:
            # Every role loads at the compute dtype: ZeRO-3 makes the trainable roles' fp32 masters from
            # the bf16 shards anyway, so an fp32 load would only double the host memory each rank needs
            # while the full model sits unpartitioned (56 GB instead of 28 GB for a 14B model).
            module = load_role_model(path, dtype, boundary_ratio, what=f"{role} model")
            if role == "teacher" and lora_roles:  # megadmd/lora: one base, a view of it per LoRA role
                from .lora.adapter import SharedBase

                module = SharedBase(module, lora_roles)
        if prepare_module is not None:
            prepare_module(role, module)
        ds_cfg = role_ds_config(role, ds, train, optim, pstate.dp_size, bf16=dtype == torch.bfloat16,
                                load_universal=load_universal)
        if role in leaf_roles:
            add_leaf_blocks(ds_cfg, module)
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
            opt = torch.optim.AdamW(param_groups(module, (own_groups or {}).get(role)), lr=o.lr, betas=tuple(o.betas),
                                    weight_decay=o.weight_decay, eps=o.eps)
            interval = generator_update_interval if role == "generator" else 1
            sched = lr_scheduler(opt, o, train.max_steps, interval)
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
