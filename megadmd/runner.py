"""``megadmd train`` as a library function: preflight, start-up, build, train, close."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from .config import RunConfig, save_resolved
from .data.format import LatentDataset
from .data.loader import BatchSource
from .dmd.trainer import DMDTrainer
from .metrics import MetricsWriter, setup_logging
from .parallel.init import env_world_size, init_distributed
from .parallel.state import ParallelState
from .preflight import TrainPlan, preflight_train
from .rng import SampleRNG
from .roles import build_models

log = logging.getLogger("megadmd")

TOY_DATASET_SIZE = 4096


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def prepare_outputs(cfg: RunConfig, plan: TrainPlan, pstate: ParallelState) -> None:
    """Rank 0 creates the output folder, saves the resolved config, writes built-in data."""
    if pstate.rank == 0:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out / "config.json")
        if plan.builtin_data and not (Path(plan.data_path) / "index.json").is_file():
            from .toy.builtin import write_toy_dataset

            log.info("writing the toy dataset (%d samples) to %s", TOY_DATASET_SIZE, plan.data_path)
            write_toy_dataset(plan.data_path, TOY_DATASET_SIZE, seed=cfg.train.seed)
    dist.barrier()


def prepare_module(cfg: RunConfig, pstate: ParallelState, role: str, module) -> None:
    """Role-specific additions to a loaded model, before DeepSpeed wraps it: our attention
    processor (Ulysses over the sp group when sp > 1), and the GAN head on the fake score."""
    from .attention.processor import configure_attention

    configure_attention(module, sp_group=pstate.sp_group, sp_size=pstate.sp_size, sp_rank=pstate.sp_rank)
    if role == "fake_score" and cfg.dmd.gan.enabled:
        from .dmd.gan import attach_gan_head

        attach_gan_head(module, cfg.dmd.gan.hidden_dim, seed=cfg.train.seed)


def build_trainer(cfg: RunConfig, local_rank: int | None = None) -> DMDTrainer:
    """Everything before the first iteration: checks, processes, outputs, engines, data."""
    plan = preflight_train(cfg, env_world_size())  # raises ConfigError before anything is written
    proc = init_distributed(cfg.parallel.backend, local_rank)
    setup_logging(proc.rank)
    pstate = ParallelState.build(cfg.parallel.sp_size)
    log.info("layout: %s, device %s", pstate.describe(), proc.device)
    prepare_outputs(cfg, plan, pstate)
    dtype = compute_dtype(cfg.model.precision, proc.device)
    models = build_models(plan.model_paths, cfg.optim, cfg.train, cfg.deepspeed, pstate, proc.device,
                          dtype, cfg.dmd.generator_update_interval,
                          prepare_module=lambda role, module: prepare_module(cfg, pstate, role, module))
    data = BatchSource(LatentDataset(plan.data_path), micro_batch=cfg.train.micro_batch_size,
                       dp_rank=pstate.dp_rank, dp_size=pstate.dp_size, seed=cfg.train.seed,
                       text_len=cfg.data.text_len, device=proc.device)
    writer = MetricsWriter(cfg.output_dir, enabled=pstate.rank == 0 and cfg.logging.tensorboard)
    return DMDTrainer(cfg, models, data, pstate, SampleRNG(cfg.train.seed, proc.device), writer,
                      proc.device)


def run_train(cfg: RunConfig, local_rank: int | None = None) -> DMDTrainer:
    """``megadmd train``: build, run every iteration, close."""
    trainer = build_trainer(cfg, local_rank)
    try:
        trainer.train()
    finally:
        trainer.writer.close()
    log.info("done: %d iterations (%d generator updates) in %s", trainer.state.step,
             trainer.state.generator_updates, cfg.output_dir)
    return trainer
