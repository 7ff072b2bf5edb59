"""``megadmd train`` as a library function: preflight, start-up, build, train, close."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import Checkpointer, read_state
from .config import RunConfig, save_resolved, to_dict
from .data.format import LatentDataset, open_dataset
from .data.loader import BatchSource
from .dmd.guard import NonFiniteError
from .dmd.trainer import DMDTrainer
from .ema import PartitionEMA
from .metrics import MetricsWriter
from .monitoring.console import setup_logging
from .parallel.init import env_world_size, init_distributed
from .parallel.state import ParallelState
from .preemption import PreemptionFlag
from .preflight import TrainPlan, preflight_train
from .rng import SampleRNG
from .roles import build_models
from .safety.runfolder import lock_output_dir, settle_resume
from .validation import build_validator
from .zero import leaf_block_roles

log = logging.getLogger("megadmd")

TOY_DATASET_SIZE = 4096


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def prepare_outputs(cfg: RunConfig, plan: TrainPlan, pstate: ParallelState) -> None:
    """Rank 0 writes the built-in data (the output folder exists: the run lock is in it). The
    resolved config.json is written only once every check has passed (``build_trainer``)."""
    if pstate.rank == 0:
        if plan.builtin_data and not (Path(plan.data_path) / "index.json").is_file():
            from .toy.builtin import write_toy_dataset

            log.info("writing the toy dataset (%d samples) to %s", TOY_DATASET_SIZE, plan.data_path)
            write_toy_dataset(plan.data_path, TOY_DATASET_SIZE, seed=cfg.train.seed)
        if plan.builtin_regression and not (Path(plan.regression_path) / "index.json").is_file():
            from .toy.builtin import TOY_PAIR_ODE_STEPS, TOY_PAIRS, write_toy_pairs

            d = cfg.dmd
            write_toy_pairs(plan.regression_path, plan.model_paths["teacher"], TOY_PAIRS, TOY_PAIR_ODE_STEPS,
                            d.guidance_scale, d.cfg_form, d.flow_shift, seed=cfg.train.seed)
        if plan.data_format == "fastvideo":  # the parquet footers are read once, here, for all ranks
            from .interop.fastvideo_data import describe_index, write_index

            idx = write_index(plan.data_path, plan.data_options["index_cache"])
            log.info("FastVideo dataset %s: %s", plan.data_path, describe_index(idx))
            if plan.data_options.get("latent_stats_source"):
                log.info("FastVideo latents normalized with %s", plan.data_options["latent_stats_source"])
    dist.barrier()


def prepare_module(cfg: RunConfig, pstate: ParallelState, vsa, paths: dict, role: str, module) -> None:
    """Role-specific additions to a loaded model, before DeepSpeed wraps it: our attention
    processor (Ulysses over the sp group when sp > 1; VSA for the generator only, as in
    FastVideo's sparse distillation), and the GAN head on the fake score."""
    from .attention.processor import configure_attention
    from .models import attach_vsa_gates, experts_of

    role_vsa = vsa if role == "generator" else None
    lora = cfg.model.lora
    if lora.enabled and role == "teacher":  # megadmd/lora: the base, and a view of it per LoRA role
        from .lora.build import prepare_shared_base

        prepare_shared_base(module, pstate, vsa, cfg.model.activation_checkpointing)
    elif lora.enabled and role in lora.roles:  # an adapter over its view, prepared with the teacher
        if role_vsa is not None:
            from .lora.build import add_vsa_gates

            add_vsa_gates(module, paths[role])
    else:
        if role_vsa is not None:
            n = attach_vsa_gates(module, paths[role])
            log.info("generator: VSA gates %s", f"loaded for {n} blocks" if n else "zero-initialized")
        configure_attention(module, sp_group=pstate.sp_group, sp_size=pstate.sp_size, sp_rank=pstate.sp_rank,
                            vsa=role_vsa)
        if getattr(cfg.model.activation_checkpointing, role):
            for expert in experts_of(module):
                expert.enable_gradient_checkpointing()  # torch.utils.checkpoint per block, non-reentrant
    if role == "fake_score" and cfg.dmd.gan.enabled:
        from .dmd.gan import attach_gan_head

        attach_gan_head(module, cfg.dmd.gan.hidden_dim, seed=cfg.train.seed, pooling=cfg.dmd.gan.pooling)


def own_param_groups(cfg: RunConfig) -> dict:
    """Parameters that train in an optimizer group of their own: the GAN head, at its own rate."""
    g = cfg.dmd.gan
    if not g.enabled:
        return {}
    from .dmd.gan import HEAD_ATTR

    lr = g.head_lr_scale * cfg.optim.fake_score.lr
    return {"fake_score": {f"{HEAD_ATTR}.": {"lr": lr, "betas": tuple(g.head_betas)}}}


def log_run_info(cfg: RunConfig, plan: TrainPlan, pstate: ParallelState, writer: MetricsWriter,
                 toy_quality: bool) -> None:
    """The resolved config and the main hyperparameters, once per start, to the tracking backends."""
    from .monitoring.hparams import main_hparams, result_metrics

    config = to_dict(cfg)
    step = 0
    if plan.resume_from is not None:
        step = int(read_state(plan.resume_from).get("step", 0))
    writer.run_info(config, main_hparams(config, pstate.world_size, pstate.dp_size), result_metrics(toy_quality), step)


def leaf_roles(cfg: RunConfig) -> tuple:
    """The roles whose blocks are ZeRO-3 leaf modules (deepspeed.leaf_blocks); logs the others' reason."""
    if not cfg.deepspeed.leaf_blocks:
        return ()
    lora = cfg.model.lora.roles if cfg.model.lora.enabled else ()
    why = leaf_block_roles(cfg.dmd, lora, cfg.model.activation_checkpointing, cfg.model.boundary_ratio is not None)
    for role, reason in why.items():
        if reason:
            log.info("deepspeed.leaf_blocks: %s fetches module by module: %s", role, reason)
    roles = tuple(role for role, reason in why.items() if not reason)
    log.info("deepspeed.leaf_blocks: %s fetch whole transformer blocks", ", ".join(roles) or "no role")
    return roles


def build_trainer(cfg: RunConfig, local_rank: int | None = None, overwrite: bool = False) -> DMDTrainer:
    """Everything before the first iteration: checks, processes, the run lock, outputs, engines,
    data, and the state of the checkpoint being resumed. The lock is held (``trainer.run_lock``)
    until ``run_train`` ends; on an error here it is released."""
    plan = preflight_train(cfg, env_world_size(), overwrite)  # raises ConfigError before anything is written
    proc = init_distributed(cfg.parallel.backend, local_rank)
    setup_logging(proc.rank)
    pstate = ParallelState.build(cfg.parallel.sp_size)
    log.info("layout: %s, device %s", pstate.describe(), proc.device)
    lock = lock_output_dir(cfg.output_dir, pstate)
    try:
        trainer = _build_locked(cfg, plan, proc, pstate, overwrite)
    except BaseException:
        lock.release()
        raise
    trainer.run_lock = lock
    return trainer


def _build_locked(cfg: RunConfig, plan: TrainPlan, proc, pstate: ParallelState, overwrite: bool) -> DMDTrainer:
    checkpointer = Checkpointer(cfg, pstate, plan.role_configs)
    plan.resume_from = settle_resume(cfg, pstate, checkpointer, overwrite)
    plan.resume_universal = plan.resume_from is not None and \
        read_state(plan.resume_from)["world_size"] != pstate.world_size
    prepare_outputs(cfg, plan, pstate)
    dtype = compute_dtype(cfg.model.precision, proc.device)
    vsa = None
    if cfg.attention.vsa_enabled:
        from .attention.processor import VSASettings
        from .attention.vsa import resolve_vsa_backend

        vsa = VSASettings(sparsity=0.0, backend=resolve_vsa_backend(cfg.attention.vsa_backend, proc.device))
    models = build_models(
        plan.model_paths, cfg.optim, cfg.train, cfg.deepspeed, pstate, proc.device, dtype,
        cfg.dmd.generator_update_interval, load_universal=plan.resume_universal,
        boundary_ratio=cfg.model.boundary_ratio, lora=cfg.model.lora, own_groups=own_param_groups(cfg),
        leaf_roles=leaf_roles(cfg), prepare_module=lambda role, module: prepare_module(cfg, pstate, vsa, plan.model_paths, role, module))
    data = BatchSource(open_dataset(plan.data_path, plan.data_format, **plan.data_options),
                       micro_batch=cfg.train.micro_batch_size,
                       dp_rank=pstate.dp_rank, dp_size=pstate.dp_size, seed=cfg.train.seed,
                       text_len=plan.text_len, device=proc.device)
    regression_data = None
    if plan.regression_path is not None:  # dmd.regression's pairs: a stream of their own
        pairs = LatentDataset(plan.regression_path) if plan.regression_path != plan.data_path else data.dataset
        regression_data = BatchSource(pairs, micro_batch=cfg.dmd.regression.batch_size or cfg.train.micro_batch_size,
                                      dp_rank=pstate.dp_rank, dp_size=pstate.dp_size, seed=cfg.train.seed + 1,
                                      text_len=plan.text_len or data.text_len, device=proc.device)
    writer = MetricsWriter(cfg.output_dir, enabled=pstate.rank == 0, logging_cfg=cfg.logging,
                           resuming=plan.resume_from is not None)
    ema = PartitionEMA(models.generator.module, cfg.ema.decay, cfg.ema.start_step) if cfg.ema.decay else None
    trainer = DMDTrainer(cfg, models, data, pstate, SampleRNG(cfg.train.seed, proc.device), writer,
                         proc.device, vsa=vsa, ema=ema, sample_shape=plan.latent_shape,
                         regression_data=regression_data)
    validator = build_validator(cfg, plan, data.dataset, trainer.steps, pstate.rank)
    if validator is not None:
        trainer.hooks.append(validator.maybe_run)
    trainer.checkpointer = checkpointer
    trainer.hooks.append(checkpointer.maybe_save)
    if plan.resume_from is not None:
        checkpointer.load(trainer, plan.resume_from)
    # after the checks of the resumed state: a refused resume leaves no event file behind
    log_run_info(cfg, plan, pstate, writer, toy_quality=validator is not None and plan.builtin_data)
    if pstate.rank == 0:
        save_resolved(cfg, Path(cfg.output_dir) / "config.json")
    dist.barrier()
    return trainer


@contextmanager
def cpu_threads(n: int):
    """torch's CPU thread count set to ``n`` (0: unchanged) inside, the caller's restored after:
    the count is process-wide, and in-process callers (tests, the benchmark) keep their own."""
    caller = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(caller)


def run_train(cfg: RunConfig, local_rank: int | None = None, overwrite: bool = False) -> DMDTrainer:
    """``megadmd train``: build, run the iterations, save a last checkpoint, close.

    SIGTERM or SIGUSR1 on any rank stops all ranks after the current iteration; they save and
    return normally (exit status 0), ready to be resumed with ``checkpoint.resume=auto``.
    """
    with cpu_threads(cfg.train.cpu_threads):
        trainer = _train(cfg, local_rank, overwrite)
    what = "preempted" if trainer.preempted else "done"
    st = trainer.state
    skipped = st.generator_skipped + st.fake_score_skipped
    log.info("%s: %d iterations (%d generator updates, %d fake_score updates%s) in %s", what, st.step,
             st.generator_updates, st.fake_score_updates,
             f"; skipped for non-finite values: {st.generator_skipped} generator, {st.fake_score_skipped} "
             f"fake_score" if skipped else "", cfg.output_dir)
    return trainer


def _train(cfg: RunConfig, local_rank: int | None, overwrite: bool) -> DMDTrainer:
    trainer = build_trainer(cfg, local_rank, overwrite)
    trainer.preemption = PreemptionFlag().install()
    ckpt = trainer.checkpointer
    try:
        try:
            trainer.train()
        except NonFiniteError:
            # Every rank raises it together (the guard's decision is world-wide), so the save
            # started before the bad iteration can still be completed: it holds good states and
            # is the one to resume from once the data or recipe is fixed.
            ckpt.finish_pending()
            raise
        ckpt.finish_pending()
        if trainer.state.step > 0 and ckpt.state_step != trainer.state.step:
            ckpt.save(trainer)
    finally:
        trainer.preemption.uninstall()
        trainer.writer.close()
        trainer.run_lock.release()
    return trainer
