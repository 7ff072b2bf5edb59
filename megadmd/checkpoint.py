"""Checkpoints: save and resume everything a run needs, atomically and verified; prune; pick one
to resume.

Layout (``<output_dir>/checkpoints``)::

    latest                       the name of the newest complete, verified checkpoint
    step-00000500/
      generator/zero/...         DeepSpeed save_checkpoint: partitioned weights, optimizer, LR schedule
      generator/latest           "zero": DeepSpeed's own tools (the zero_to_fp32.py it copies into
                                 generator/, ds_to_universal) read the tag from it
      fake_score/zero/...        (the GAN head, when present, is part of the fake score's module)
      <role>/config.json         the role's model config, for `megadmd convert` (config_2.json:
                                 the low-noise expert of a two-expert model)
      ema/rank_<r>.pt            each rank's EMA partitions
      ema/ema.safetensors        the gathered EMA (resuming at another world size; export)
      ranks/rank_<r>.pt          per-rank RNG states and the open logging window
      trainer_state.json         counters, data position, layout, model paths
      config.json                the resolved config
      manifest.json              every file's size and content hash, written last: the checkpoint
                                 is complete (megadmd/safety/manifest.py)

A checkpoint is written under a temporary name and renamed into place by rank 0 once every rank
has finished and every file is hashed, and ``latest`` is rewritten only after that, so a crash in
the middle of a save leaves the previous checkpoint intact and ``latest`` pointing at it. A write
that fails on any rank (a full disk) fails the save on every rank together: the temporary folder
is removed and one line says what happened. Each rank hashes the files it wrote on a thread pool
while the next role is being written; a periodic save returns as soon as the files are written,
and is completed (hashes gathered, manifest, rename) at the next iteration, so the hashing
overlaps that iteration. Resuming checks every file's hash (spread over the ranks)
and skips damaged checkpoints under ``--resume auto``; pruning keeps the newest ``keep_last``
verified checkpoints (docs/checkpoints.md). The teacher is frozen and is reloaded from its folder
(DeepSpeed cannot save an engine without an optimizer).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .config import TRAINABLE_ROLES, ConfigError, RunConfig, save_resolved
from .io_utils import atomic_torch_save, atomic_write_text
from .safety import manifest

log = logging.getLogger("megadmd")
DS_TAG = "zero"
UNIVERSAL_TAG = "zero_universal"
MANIFEST = manifest.MANIFEST
STATE = "trainer_state.json"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path) -> int:
    return int(path.name[5:])


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-or-damaged checkpoint folders, newest first (temporary folders are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=step_of, reverse=True)


def verify(path: Path, only: Optional[tuple] = None, deep: bool = True) -> Optional[str]:
    """None if the checkpoint is whole; otherwise what is wrong, naming the file. ``deep=False``
    checks sizes only (fast: what start-up checks before the ranks verify the hashes together);
    ``only``: the files whose relative paths start with these prefixes."""
    return manifest.verify(Path(path), only=only, deep=deep)


def read_state(path: Path) -> dict:
    return json.loads((path / STATE).read_text())


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


class _SaveRecord:
    """One rank's part of a save: its first failed write, and the hashing of the files it wrote."""

    def __init__(self, root: Path, hash_files: bool):
        self.error: Optional[str] = None
        self.hasher = manifest.Hasher(root) if hash_files else None

    def fail(self, what: str, exc) -> None:
        if self.error is None:
            self.error = f"{what}: {exc}"

    def run(self, what: str, fn: Callable[[], None]) -> None:
        """``fn`` unless a write already failed. An OSError (a full disk, ...) is recorded, not
        raised, so this rank still joins every collective of the save."""
        if self.error is None:
            try:
                fn()
            except OSError as exc:
                self.fail(what, exc)

    def hash(self, paths) -> None:
        if self.hasher is not None:
            for path in paths:
                self.run(f"hashing {path}", lambda path=path: self.hasher.submit(path))

    def finish(self) -> dict:
        """Wait for the hashes: ``{relative path: {"bytes", "hash"}}``."""
        if self.hasher is None:
            return {}
        try:
            return self.hasher.results()
        except OSError as exc:
            self.fail("hashing", exc)
            return {}


def _recorded_writes(engine) -> dict:
    """The files DeepSpeed's checkpoint engine writes on this rank, recorded by wrapping its
    ``save`` and ``makedirs`` (once per engine). A failed write is recorded rather than raised, so
    DeepSpeed's save still reaches its collectives on this rank and no rank waits forever."""
    ce = engine.checkpoint_engine
    writes = getattr(ce, "_megadmd_writes", None)
    if writes is None:
        writes = {"paths": [], "error": None}
        save, makedirs = ce.save, ce.makedirs

        def recorded_save(state_dict, path):
            if writes["error"] is None:
                try:
                    save(state_dict, path)
                    writes["paths"].append(Path(path))
                except OSError as exc:
                    writes["error"] = exc

        def recorded_makedirs(path, exist_ok=False):
            try:
                makedirs(path, exist_ok=exist_ok)
            except OSError as exc:
                writes["error"] = writes["error"] or exc

        ce.save, ce.makedirs, ce._megadmd_writes = recorded_save, recorded_makedirs, writes
    writes["paths"].clear()
    writes["error"] = None
    return writes


class Checkpointer:
    """Saves and loads a DMDTrainer's state. Every method is collective (all ranks call it),
    unless it says otherwise.

    ``hash_files=False`` (benchmarks only) writes sizes without content hashes.
    """

    def __init__(self, cfg: RunConfig, pstate, model_configs: dict, hash_files: bool = True):
        self.cfg = cfg
        self.pstate = pstate
        self.root = checkpoints_dir(cfg.output_dir)
        self.model_configs = model_configs  # role -> config.json dict
        self.hash_files = hash_files
        self.verdicts: dict[str, Optional[str]] = {}  # resolved path -> None (verified) or the problem
        self.state_step: Optional[int] = None  # the step of the checkpoint equal to the trainer's state
        self._pending: Optional[tuple] = None  # a save whose files are written and being hashed

    # --- saving ------------------------------------------------------------------------------
    def maybe_save(self, trainer) -> None:
        """The per-iteration hook: completes the previous iteration's save, then starts one every
        ``interval_steps`` (completed at the next iteration, so its hashing overlaps that one)."""
        self.finish_pending()
        n = self.cfg.checkpoint.interval_steps
        if n and trainer.state.step % n == 0:
            self.save(trainer, wait=False)

    def save(self, trainer, wait: bool = True) -> Path:
        """Save the trainer's state as ``step-N``: every rank writes its files and hashes them on its
        pool, rank 0 writes the shared ones. With ``wait`` the manifest is written and the folder
        renamed into place before returning; otherwise ``finish_pending`` does that later (the
        hashes keep going meanwhile; until then a crash leaves only an ``.incomplete`` folder)."""
        self.finish_pending()
        step, rank = trainer.state.step, self.pstate.rank
        final = self.root / step_name(step)
        tmp = self.root / f".{step_name(step)}.incomplete"
        start = _SaveRecord(tmp, hash_files=False)
        if rank == 0:
            start.run("creating its folder", lambda: _fresh_dir(tmp))
        self._agree(start, final, tmp)
        record = _SaveRecord(tmp, self.hash_files)
        for role in TRAINABLE_ROLES:
            self._save_engine(trainer.models.engine(role), tmp / role, record)
        self._save_ema(trainer, tmp, record)
        rank_file = tmp / "ranks" / f"rank_{rank}.pt"
        record.run("writing the rank state", lambda: atomic_torch_save(
            {"rng": _rng_state(), "window": trainer.window.state_dict()}, rank_file))
        record.hash([rank_file])
        if rank == 0:
            record.run("writing the run state", lambda: self._write_shared(trainer, tmp))
        self._agree(record, final, tmp, join=False)  # a failed write stops every rank now
        if os.environ.get("MEGADMD_CRASH_POINT") == f"mid-save:{step}" and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die with the engines saved, not renamed
        self._pending = (record, final, tmp)
        self.state_step = step
        if wait:
            self.finish_pending()
        return final

    def finish_pending(self) -> None:
        """Complete a started save: gather the hashes, and rank 0 writes the manifest, renames the
        folder into place, points ``latest`` at it and prunes. A no-op when none is pending."""
        if self._pending is None:
            return
        record, final, tmp = self._pending
        self._pending = None
        hashed = self._agree(record, final, tmp)
        done = _SaveRecord(tmp, hash_files=False)
        if self.pstate.rank == 0:
            done.run("finishing", lambda: self._finish(tmp, final, hashed))
        self._agree(done, final, tmp)
        log.info("checkpoint saved: %s", final)

    def _save_engine(self, engine, role_dir: Path, record: _SaveRecord) -> None:
        writes = _recorded_writes(engine)
        try:
            # save_latest: the role folder's `latest` names the tag, so the zero_to_fp32.py DeepSpeed
            # copies there, and DeepSpeed's other tools, find it with no -t flag
            engine.save_checkpoint(str(role_dir), tag=DS_TAG, save_latest=True)
        except OSError as exc:
            # Writes through the checkpoint engine never raise (_recorded_writes): what can still
            # fail is rank 0 copying DeepSpeed's recovery scripts or writing `latest`, its last steps
            # before the barrier that ends save_checkpoint; meet the other ranks at that barrier.
            record.fail(f"saving {role_dir.name}", exc)
            dist.barrier()
        if writes["error"] is not None:
            record.fail(f"saving {role_dir.name}", writes["error"])
        record.hash(writes["paths"])  # read back on the pool while the next role is written

    def _save_ema(self, trainer, tmp: Path, record: _SaveRecord) -> None:
        if trainer.ema is None:
            return
        local = tmp / "ema" / f"rank_{self.pstate.rank}.pt"
        record.run("writing the EMA", lambda: atomic_torch_save(trainer.ema.local_state(), local))
        record.hash([local])
        full = trainer.ema.full_state_dict()  # collective
        if full is not None and self.pstate.rank == 0:
            from safetensors.torch import save_file

            path = tmp / "ema" / "ema.safetensors"
            record.run("writing the EMA", lambda: save_file({k: v.contiguous() for k, v in full.items()}, str(path)))
            record.hash([path])

    def _agree(self, record: _SaveRecord, final: Path, tmp: Path, join: bool = True) -> dict:
        """Every rank's outcome and, with ``join``, its hashes (collective). If any rank failed,
        rank 0 removes the unfinished folder and every rank raises the same line."""
        hashed = record.finish() if join else {}
        gathered = [None] * self.pstate.world_size
        dist.all_gather_object(gathered, (record.error, hashed), group=self.pstate.world_group)
        failed = [(r, error) for r, (error, _) in enumerate(gathered) if error]
        if not failed:
            return {rel: entry for _, files in gathered for rel, entry in files.items()}
        if not join:
            record.finish()  # no hashing thread outlives the save
        if self.pstate.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        rank, error = failed[0]
        raise ConfigError(f"checkpoint {final.name} could not be saved (rank {rank}, {error}); its unfinished "
                          f"folder was removed and {self._previous()}: free some space (or fix the folder) and "
                          f"resume with --resume auto")

    def _previous(self) -> str:
        latest = self.root / "latest"
        name = latest.read_text().strip() if latest.is_file() else ""
        return f"the previous checkpoint {name} and 'latest' are unchanged" if name else "no earlier checkpoint exists"

    def _write_shared(self, trainer, tmp: Path) -> None:
        """Rank 0: the files every rank shares, from the state at the moment of the save."""
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

    def _finish(self, tmp: Path, final: Path, hashed: dict) -> None:
        """Rank 0: the manifest (hashing the files no rank hashed: the shared ones, DeepSpeed's
        recovery scripts), written last; then the rename, ``latest`` and pruning."""
        manifest.write_manifest(tmp, hashed, hash_rest=self.hash_files)
        _replace_dir(tmp, final)
        self.verdicts[str(final.resolve())] = None
        try:
            atomic_write_text(self.root / "latest", final.name + "\n")
            self._prune()
        except OSError as exc:  # the checkpoint itself is complete: resume auto finds it without 'latest'
            log.warning("checkpoint %s is saved, but updating 'latest' or pruning failed: %s", final.name, exc)

    def verdict(self, path: Path) -> Optional[str]:
        """Rank 0 only: None if ``path`` is verified, else its problem (hashed once per process)."""
        key = str(path.resolve())
        if key not in self.verdicts:
            self.verdicts[key] = verify(path)
        return self.verdicts[key]

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` verified checkpoints; delete every checkpoint older than the
        oldest one kept. Damaged ones do not count, and are deleted only once they fall behind."""
        keep = self.cfg.checkpoint.keep_last
        if not keep:
            return
        kept = 0
        for path in list_checkpoints(self.root):
            if kept >= keep:
                shutil.rmtree(path, ignore_errors=True)
                self.verdicts.pop(str(path.resolve()), None)
                continue
            problem = self.verdict(path)
            if problem is None:
                kept += 1
            else:
                log.warning("checkpoint %s is damaged (%s); it does not count towards checkpoint.keep_last",
                            path.name, problem)

    # --- loading -----------------------------------------------------------------------------
    def choose_resume(self, candidates: list, explicit: bool) -> Optional[Path]:
        """The first of ``candidates`` (newest first) whose every file matches its content hash,
        the ranks sharing the files by size. ``explicit`` (a path was given): damage is an error."""
        for path in candidates:
            problem = self._verify_together(Path(path))
            self.verdicts[str(Path(path).resolve())] = problem
            if problem is None:
                return Path(path)
            if explicit:
                raise ConfigError(f"checkpoint.resume: checkpoint {problem}")
            log.warning("resume auto: skipping damaged checkpoint: %s", problem)
        if candidates:
            raise ConfigError(f"--resume auto: no intact checkpoint in {self.root} (all {len(candidates)} are "
                              f"damaged, the newest: {self.verdicts[str(Path(candidates[0]).resolve())]}); "
                              f"refusing to start the run over: move them aside, or choose a new output_dir")
        return None

    def _verify_together(self, path: Path) -> Optional[str]:
        try:
            files, hashed = manifest.read_manifest(path)
        except ValueError as exc:
            return str(exc)
        if not hashed and self.pstate.rank == 0:
            log.warning("%s has no content hashes (saved by an older megadmd): only file sizes are checked",
                        path.name)
        mine = manifest.share_of(files, self.pstate.rank, self.pstate.world_size)
        found = [None] * self.pstate.world_size
        dist.all_gather_object(found, manifest.check_files(path, files, mine), group=self.pstate.world_group)
        return next((p for p in found if p), None)

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
        from .safety.finite import check_loaded_state

        check_loaded_state(trainer.models, trainer.ema, path.name, group=self.pstate.world_group)
        self.state_step = trainer.state.step
        if self.pstate.rank == 0 and path.resolve().parent == self.root.resolve():
            _point_latest_at(self.root, path)
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


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # left by a save that was killed
    path.mkdir(parents=True)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``. An existing ``final`` (a damaged checkpoint of the same step,
    left behind when resume auto fell back past it) is moved aside first, then deleted."""
    if final.exists():
        log.info("replacing the earlier %s", final.name)
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".replaced", dir=final.parent))
        os.replace(final, aside / final.name)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _point_latest_at(root: Path, path: Path) -> None:
    """``latest`` names the checkpoint resumed from when newer ones were skipped as damaged."""
    latest = root / "latest"
    if not latest.is_file() or latest.read_text().strip() != path.name:
        atomic_write_text(latest, path.name + "\n")


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

