"""``megadmd plan`` from a run's own config (``-c run.yaml``, ``--set``, ``--preset``), with the
command-line flags overriding it, and the report: the memory table, then the time estimate.

What the planner reads from the config: the architecture (the teacher's config.json when
``model.teacher_path`` is a folder here, else the preset's), ``data.latent_shape`` and
``data.text_len``, ``parallel.sp_size``, ``train.micro_batch_size``, ``grad_accum_steps`` and
``max_steps``, ``model.precision`` and ``model.activation_checkpointing``, the DeepSpeed
templates (bucket sizes, offload), ``ema.decay``, ``attention.vsa_*`` (with its ramp) and the
loop's ``dmd`` settings (update interval, data-free mode, GAN). The layout (nodes, GPUs per node)
comes from the launcher, so it is a flag only. A trainable role's way of training is one
``compute.RoleCompute`` per role: that is where a LoRA rank enters when LoRA lands (frozen base
weights: no weight gradients, plus the adapters' FLOPs and memory).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import RunConfig
from .compute import LoopSettings, RoleCompute, TimePlan, WanShape, format_time, get_gpu, plan_time
from .memory import MemoryPlan, default_zero_settings, format_plan, plan_memory, template_offload


@dataclass
class PlanFlags:
    """Command-line overrides; None means "as the config says"."""

    video_size: Optional[tuple] = None
    nodes: int = 1
    gpus_per_node: int = 8
    sp: Optional[int] = None
    micro_batch: Optional[int] = None
    offload: Optional[str] = None
    activation_checkpointing: Optional[bool] = None
    vsa_sparsity: Optional[float] = None
    ema: Optional[bool] = None
    precision: Optional[str] = None
    gpu: str = "h100"
    gpu_memory_gib: Optional[float] = None
    peak_tflops: Optional[float] = None
    utilisation: Optional[float] = None


@dataclass
class RunPlan:
    memory: MemoryPlan
    time: TimePlan
    architecture: str  # where the architecture came from
    generator_update_interval: int

    @property
    def fits(self) -> bool:
        return self.memory.fits


def _architecture(cfg: RunConfig):
    """(model for plan_memory, a phrase saying where it came from)."""
    from ..models import read_model_config
    from ..presets import get_preset

    teacher = cfg.model.teacher_path
    if teacher and Path(teacher).expanduser().exists():
        return read_model_config(teacher, what="teacher model"), f"the teacher's config.json ({teacher})"
    preset = get_preset(cfg.preset)
    note = f" (model.teacher_path {teacher} is not here)" if teacher else ""
    return preset.name, f"preset {preset.name}{note}"


def _vsa_schedule(cfg: RunConfig, flags: PlanFlags):
    """(sparsity for the memory plan, step -> sparsity for the FLOPs, or None when VSA is off)."""
    from ..attention.processor import vsa_sparsity_at

    if flags.vsa_sparsity is not None:
        target = flags.vsa_sparsity
        return target, (lambda step: target) if target > 0 else None
    a = cfg.attention
    if not a.vsa_enabled:
        return 0.0, None
    return a.vsa_sparsity, lambda step: vsa_sparsity_at(step, a.vsa_sparsity, a.vsa_decay_rate,
                                                        a.vsa_decay_interval_steps)


def loop_settings(cfg: RunConfig, checkpointing: dict, micro_batch: int, layers: int) -> LoopSettings:
    d = cfg.dmd
    gan_block = (d.gan.block_index if d.gan.block_index is not None else layers // 2) if d.gan.enabled else None
    return LoopSettings(
        generator_update_interval=d.generator_update_interval, num_steps=len(d.denoising_steps),
        train_first_step=d.train_first_step, data_free=d.simulate_generator_forward, gan_block=gan_block,
        micro_batch=micro_batch, grad_accum=cfg.train.grad_accum_steps,
        generator=RoleCompute(checkpointing=checkpointing["generator"]),
        fake_score=RoleCompute(checkpointing=checkpointing["fake_score"]))


def plan_run(cfg: RunConfig, flags: PlanFlags) -> RunPlan:
    """Memory and time of the run ``cfg`` describes, on ``flags.nodes x flags.gpus_per_node`` GPUs."""
    gpu = get_gpu(flags.gpu)
    model, source = _architecture(cfg)
    sparsity, schedule = _vsa_schedule(cfg, flags)
    ac = cfg.model.activation_checkpointing
    checkpointing = (flags.activation_checkpointing if flags.activation_checkpointing is not None
                     else {"generator": ac.generator, "fake_score": ac.fake_score})
    latent_shape = tuple(cfg.data.latent_shape) if cfg.data.latent_shape and flags.video_size is None else None
    video_size = flags.video_size
    if isinstance(model, dict) and video_size is None and latent_shape is None:
        from ..presets import get_preset

        video_size = get_preset(cfg.preset).video_size
    precision = flags.precision or ("fp32" if cfg.model.precision == "fp32" else "bf16")
    micro_batch = flags.micro_batch or cfg.train.micro_batch_size
    sp = flags.sp or cfg.parallel.sp_size
    memory = plan_memory(
        model, video_size=video_size, latent_shape=latent_shape, nodes=flags.nodes, gpus_per_node=flags.gpus_per_node,
        sp=sp, offload=flags.offload or template_offload(cfg.deepspeed), micro_batch=micro_batch,
        activation_checkpointing=checkpointing, vsa_sparsity=sparsity,
        ema=flags.ema if flags.ema is not None else cfg.ema.decay > 0,
        gpu_memory_gib=flags.gpu_memory_gib or gpu.memory_gib, precision=precision,
        text_len=cfg.data.text_len or None, zero=default_zero_settings(cfg.deepspeed))
    shape = WanShape.of(memory.wan_config, memory.latent_shape, memory.text_len)
    loop = loop_settings(cfg, memory.checkpointing, micro_batch, shape.layers)
    time = plan_time(shape, loop, sp, memory.world_size, cfg.train.max_steps, schedule, gpu=gpu.name,
                     peak_tflops=flags.peak_tflops, utilisation=flags.utilisation, precision=precision)
    return RunPlan(memory=memory, time=time, architecture=source,
                   generator_update_interval=cfg.dmd.generator_update_interval)


def format_run_plan(p: RunPlan) -> str:
    return "\n".join([f"architecture: {p.architecture}", format_plan(p.memory),
                      format_time(p.time, p.generator_update_interval)])
