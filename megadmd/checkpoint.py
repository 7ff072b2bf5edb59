"""Checkpoints: save and resume everything a run needs, atomically; prune; pick one to resume.

Layout (``<output_dir>/checkpoints``)::

    latest                       the name of the newest complete checkpoint
    step-00000500/
      generator/zero/...         DeepSpeed save_checkpoint: partitioned weights, optimizer, LR schedule
      fake_score/zero/...        (the GAN head, when present, is part of the fake score's module)
      <role>/config.json         the role's model config, for `megadmd convert` (config_2.json:
                                 the low-noise expert of a two-expert model)
      ema/rank_<r>.pt            each rank's EMA partitions
      ema/ema.safetensors        the gathered EMA (resuming at another world size; export)
      ranks/rank_<r>.pt          per-rank RNG states and the open logging window
      trainer_state.json         counters, data position, layout, model paths
      config.json                the resolved config
      manifest.json              every file's size, written last: the checkpoint is complete

A checkpoint is written under a temporary name and renamed into place by rank 0 once every rank
has finished, and ``latest`` is rewritten only after that, so a crash in the middle of a save
leaves the previous checkpoint intact and ``latest`` pointing at it. The teacher is frozen and is
reloaded from its folder (DeepSpeed cannot save an engine without an optimizer).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .config import TRAINABLE_ROLES, ConfigError, RunConfig, save_resolved
from .io_utils import atomic_torch_save, atomic_write_text

log = logging.getLogger("megadmd")
DS_TAG = "zero"
UNIVERSAL_TAG = "zero_universal"
MANIFEST = "manifest.json"
STATE = "trainer_state.json"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-or-damaged checkpoint folders, newest first (temporary folders are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def verify(path: Path) -> Optional[str]:
    """None if the checkpoint is whole; otherwise what is wrong, naming the file."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"{path.name} has no {MANIFEST} (its save did not finish)"
    try:
        sizes = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return f"{path.name}/{MANIFEST} is not valid JSON"
    for rel, size in sizes.items():
        f = path / rel
        if not f.is_file():
            return f"{path.name}/{rel} is missing"
        if f.stat().st_size != size:
            return f"{path.name}/{rel} has {f.stat().st_size} bytes, expected {size} (truncated or damaged)"
    return None


def find_resume(output_dir: str | Path, resume: str) -> Optional[Path]:
    """The checkpoint to resume from: "" none, "auto" the newest intact one, else a path."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"checkpoint.resume: no checkpoint folder at {path}")
        problem = verify(path)
        if problem:
            raise ConfigError(f"checkpoint.resume: checkpoint {problem}")
        return path
    for path in list_checkpoints(checkpoints_dir(output_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("resume auto: skipping damaged checkpoint: %s", problem)
    return None


def read_state(path: Path) -> dict:
    return json.loads((path / STATE).read_text())


def _manifest(root: Path) -> dict:
    return {str(f.relative_to(root)): f.stat().st_size for f in sorted(root.rglob("*"))
            if f.is_file() and f.name != MANIFEST}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Saves and loads a DMDTrainer's state. Every method is collective: all ranks call it."""

    def __init__(self, cfg: RunConfig, pstate, model_configs: dict):
        self.cfg = cfg
        self.pstate = pstate
        self.root = checkpoints_dir(cfg.output_dir)
        self.model_configs = model_configs  # role -> config.json dict

    # --- saving ------------------------------------------------------------------------------
    def maybe_save(self, trainer) -> None:
        n = self.cfg.checkpoint.interval_steps
        if n and trainer.state.step % n == 0:
            self.save(trainer)

    def save(self, trainer) -> Path:
        step = trainer.state.step
        final = self.root / step_name(step)
        tmp = self.root / f".{step_name(step)}.incomplete"
        if self.pstate.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        for role in TRAINABLE_ROLES:
            trainer.models.engine(role).save_checkpoint(str(tmp / role), tag=DS_TAG, save_latest=False)
        self._save_ema(trainer, tmp)
        atomic_torch_save({"rng": _rng_state(), "window": trainer.window.state_dict()},
                          tmp / "ranks" / f"rank_{self.pstate.rank}.pt")
        dist.barrier()
        if os.environ.get("MEGADMD_CRASH_POINT") == f"mid-save:{step}" and self.pstate.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die with the engines saved, not renamed
        if self.pstate.rank == 0:
            self._finish(trainer, tmp, final)
        dist.barrier()
        log.info("checkpoint saved: %s", final)
        return final

    def _save_ema(self, trainer, tmp: Path) -> None:
        if trainer.ema is None:
            return
        atomic_torch_save(trainer.ema.local_state(), tmp / "ema" / f"rank_{self.pstate.rank}.pt")
        full = trainer.ema.full_state_dict()  # collective
        if full is not None and self.pstate.rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in full.items()}, str(tmp / "ema" / "ema.safetensors"))

    def _finish(self, trainer, tmp: Path, final: Path) -> None:
        p = self.pstate
        state = {
            **trainer.state.state_dict(),
            "samples_consumed": trainer.data.micro_step * p.dp_size * trainer.data.micro_batch,
            "world_size": p.world_size, "dp_size": p.dp_size, "sp_size": p.sp_size,
            "model_paths": trainer.models.paths,
            "ema_started": bool(trainer.ema is not None and trainer.ema.started),
        }
        atomic_write_text(tmp / STATE, json.dumps(state, indent=1) + "\n")
        save_resolved(self.cfg, tmp / "config.json")
        for key, mcfg in self.model_configs.items():  # "<role>" and, for two experts, "<role>:low"
            role, _, low = key.partition(":")
            if role in TRAINABLE_ROLES:
                name = "config_2.json" if low else "config.json"
                atomic_write_text(tmp / role / name, json.dumps(mcfg, indent=1) + "\n")
        atomic_write_text(tmp / MANIFEST, json.dumps(_manifest(tmp), indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(self.root / "latest", final.name + "\n")
        self._prune()

    def _prune(self) -> None:
        keep = self.cfg.checkpoint.keep_last
        if keep:
            for old in list_checkpoints(self.root)[keep:]:
                shutil.rmtree(old, ignore_errors=True)

    # --- loading -----------------------------------------------------------------------------
    def load(self, trainer, path: Path) -> None:
        state = read_state(path)
        universal = state["world_size"] != self.pstate.world_size
        tag = UNIVERSAL_TAG if universal else DS_TAG
        if universal and self.pstate.rank == 0:
            for role in TRAINABLE_ROLES:
                to_universal(path / role)
        dist.barrier()
        for role in TRAINABLE_ROLES:
            loaded, _ = trainer.models.engine(role).load_checkpoint(str(path / role), tag=tag)
            if loaded is None:
                raise ConfigError(f"checkpoint {path}: DeepSpeed could not load {role}/{tag}")
        trainer.state.load_state_dict(state)
        per_sample_step = self.pstate.dp_size * trainer.data.micro_batch
        trainer.data.micro_step = -(-state["samples_consumed"] // per_sample_step)  # ceil: never repeat data
        self._load_ema(trainer, path, state, universal)
        rank_file = path / "ranks" / f"rank_{self.pstate.rank}.pt"
        if not universal and rank_file.is_file():
            saved = torch.load(rank_file, weights_only=False)
            _set_rng_state(saved["rng"])
            trainer.window.load_state_dict(saved["window"])
        log.info("resumed from %s at step %d%s", path, trainer.state.step,
                 f" (saved on {state['world_size']} ranks, universal checkpoint)" if universal else "")

    def _load_ema(self, trainer, path: Path, state: dict, universal: bool) -> None:
        if trainer.ema is None or not state.get("ema_started"):
            return
        if universal:
            from safetensors.torch import load_file

            trainer.ema.load_full_state_dict(load_file(str(path / "ema" / "ema.safetensors")))
        else:
            trainer.ema.load_local_state(torch.load(path / "ema" / f"rank_{self.pstate.rank}.pt", weights_only=False))


def to_universal(role_dir: Path) -> Path:
    """Convert ``<role_dir>/zero`` to DeepSpeed's universal format (world-size independent)."""
    out = role_dir / UNIVERSAL_TAG
    if (out / "done").is_file():
        return out
    import sys

    from deepspeed.checkpoint import ds_to_universal

    argv = sys.argv
    shutil.rmtree(out, ignore_errors=True)
    try:
        sys.argv = ["ds_to_universal", "--input_folder", str(role_dir / DS_TAG), "--output_folder", str(out),
                    "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
        ds_to_universal.main(ds_to_universal.parse_arguments())
    finally:
        sys.argv = argv
    atomic_write_text(out / "done", "ok\n")
    return out

