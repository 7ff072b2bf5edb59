"""The rules of a training run's output folder: one run at a time, no silent restart, and the
checkpoint a run continues from and the config it may continue with (docs/checkpoints.md).

- ``train`` without ``checkpoint.resume`` in a folder that holds checkpoints refuses (it would
  start over and prune the old run's checkpoints).
- ``--resume auto`` in a folder with no checkpoint starts fresh (a Slurm job's first start and
  its requeues run the same command), but with checkpoints of which none is intact it refuses.
- ``--resume PATH`` of an older checkpoint of the same run, while newer intact ones exist,
  refuses: the continued run would overwrite them.
- A resumed config is compared with the checkpoint's own config.json: every changed key is
  logged; keys that change the optimisation need ``checkpoint.allow_config_change``
  (``--allow-config-change``); ``train.max_steps`` below the checkpoint's step refuses.

``plan_resume`` only reads; preflight runs it on every rank before any process group exists, and
rank 0 runs it again under the run lock, whose answer every rank then follows.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..config import ConfigError, RunConfig, to_dict
from .folders import LOCK_FILE, check_run_dir
from .runlock import RunLock

log = logging.getLogger("megadmd")

# Keys that a resumed run may change freely: where and how often it logs, validates and saves,
# how long it runs, DeepSpeed tuning, memory-only switches, and the layout (a change of the
# global batch it implies is checked on its own, below).
FREE_KEYS = ("output_dir", "preset", "train.max_steps", "train.micro_batch_size", "train.grad_accum_steps",
             "train.nonfinite", "train.max_consecutive_skips",  # what to do on a bad update, not how to learn
             "train.cpu_threads",  # how fast, not what: the same numbers up to float rounding
             "checkpoint.", "logging.", "validation.", "parallel.", "deepspeed.",
             "model.activation_checkpointing.", "attention.vsa_backend")

# keys that decide which tensors the trainable roles' checkpoints hold: no flag can accept a change
# (the saved adapters would not fit the new roles; docs/lora.md)
STRUCTURE_KEYS = ("model.lora.enabled", "model.lora.rank", "model.lora.target_modules", "model.lora.roles")

@dataclass
class ResumePlan:
    candidates: list = field(default_factory=list)  # checkpoints to try, newest first; [] = fresh start
    explicit: bool = False  # checkpoint.resume named a path: a damaged one is an error, not skipped


def plan_resume(cfg: RunConfig, overwrite: bool = False, quiet: bool = False) -> ResumePlan:
    """What ``train`` does with its output folder, from the files alone (sizes, not hashes)."""
    from ..checkpoint import checkpoints_dir, list_checkpoints, step_of, verify

    out = Path(cfg.output_dir)
    check_run_dir(out, overwrite)
    root = checkpoints_dir(out)
    found = list_checkpoints(root)
    resume = cfg.checkpoint.resume
    if not resume:
        if found:
            raise ConfigError(f"output_dir {out} already holds checkpoints (the newest: {found[0].name}); continue "
                              f"that run with --resume auto, or choose a new output_dir")
        return ResumePlan()
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"checkpoint.resume: no checkpoint folder at {path}")
        problem = verify(path, deep=False)
        if problem:
            raise ConfigError(f"checkpoint.resume: checkpoint {problem}")
        if path.resolve().parent == root.resolve():
            newer = [p for p in found if step_of(p) > step_of(path) and verify(p, deep=False) is None]
            if newer:
                raise ConfigError(f"checkpoint.resume={path} is older than {newer[0].name} of the same run, which "
                                  f"the continued run would overwrite; use --resume auto, or continue it in a new "
                                  f"output_dir")
        return ResumePlan([path], explicit=True)
    intact = []
    for path in found:
        problem = verify(path, deep=False)
        if problem is None:
            intact.append(path)
        elif not quiet:
            log.warning("resume auto: skipping damaged checkpoint: %s", problem)
    if found and not intact:
        raise ConfigError(f"--resume auto: no intact checkpoint in {root} (all {len(found)} are damaged, the newest: "
                          f"{verify(found[0], deep=False)}); refusing to start the run over: move them aside, or "
                          f"choose a new output_dir")
    return ResumePlan(intact)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """``(key, old, new)`` for every key both configs have and that differs. (A key only one side
    has comes from another megadmd version and keeps its default behaviour.)"""
    a, b = _flatten(old), _flatten(new)
    same = ("checkpoint.resume",)  # how this run was started, not what it trains
    return [(k, a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k] and k not in same]


def _is_free(key: str) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE_KEYS)


def check_resume_config(cfg: RunConfig, ckpt: Path, dp_size: int, log_changes: bool = False) -> None:
    """Refuse a resume whose config changes the optimisation without ``allow_config_change``, or
    whose ``train.max_steps`` is below the checkpoint's step; log every changed key."""
    from ..checkpoint import read_state

    state = read_state(ckpt)
    if cfg.train.max_steps < state["step"]:
        raise ConfigError(f"train.max_steps={cfg.train.max_steps} is below the step of the checkpoint to resume "
                          f"({ckpt.name} is at step {state['step']}); raise train.max_steps to continue the run")
    try:
        old = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint {ckpt.name} has no readable config.json ({exc})") from None
    changes = config_changes(old, to_dict(cfg))
    t_old, t_new = old.get("train", {}), cfg.train
    batch_old = state["dp_size"] * t_old.get("micro_batch_size", 0) * t_old.get("grad_accum_steps", 0)
    batch_new = dp_size * t_new.micro_batch_size * t_new.grad_accum_steps
    if batch_old != batch_new:
        changes.append(("global batch (dp x train.micro_batch_size x train.grad_accum_steps)", batch_old, batch_new))
    if not changes:
        return
    fixed = [k for k, _, _ in changes if k in STRUCTURE_KEYS]
    if fixed:
        raise ConfigError(f"resuming {ckpt.name} with other LoRA settings ({', '.join(fixed)}): its saved roles "
                          f"would not fit; resume with the checkpoint's values, or start a new run")
    bound = [c for c in changes if not _is_free(c[0])]
    listed = "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes)
    if bound and not cfg.checkpoint.allow_config_change:
        raise ConfigError(f"resuming {ckpt.name} with a config that changes the optimisation: "
                          f"{', '.join(k for k, _, _ in bound)} (all changes: {listed}); pass "
                          f"--allow-config-change to accept, or resume with the checkpoint's values")
    if log_changes:
        log.info("resume: the config differs from %s's: %s%s", ckpt.name, listed,
                 " (accepted with --allow-config-change)" if bound else "")


def on_rank0(fn: Callable[[], object], pstate) -> object:
    """Run ``fn`` on rank 0 only and give every rank its result; a ConfigError there is raised on
    every rank (collective over the world group)."""
    import torch.distributed as dist

    result, error = None, None
    if pstate.rank == 0:
        try:
            result = fn()
        except ConfigError as exc:
            error = str(exc)
    box = [(result, error)]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0, group=pstate.world_group)
    result, error = box[0]
    if error:
        raise ConfigError(error)
    return result


def lock_output_dir(output_dir: str, pstate) -> RunLock:
    """Rank 0 takes the run lock; if another run holds it, every rank raises the same line."""
    lock = RunLock(Path(output_dir) / LOCK_FILE)

    def take() -> None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        holder = lock.acquire()
        if holder:
            raise ConfigError(f"output_dir {output_dir} is in use by another megadmd train ({holder}); wait for it "
                              f"to end, or choose another output_dir")

    on_rank0(take, pstate)
    return lock


def settle_resume(cfg: RunConfig, pstate, checkpointer, overwrite: bool) -> Optional[Path]:
    """Under the run lock: rank 0 re-reads the folder (another run may have saved since the
    preflight), every rank verifies the candidates' hashes together, and the config is checked
    against the checkpoint chosen."""
    plan = on_rank0(lambda: plan_resume(cfg, overwrite, quiet=True), pstate)
    chosen = checkpointer.choose_resume(plan.candidates, plan.explicit)
    if chosen is not None:
        check_resume_config(cfg, chosen, pstate.dp_size, log_changes=True)
    return chosen
