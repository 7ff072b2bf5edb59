"""Output folders: what a folder holds, and whether a command may write into it or replace it.

The rules (README, "Your data is safe"):
- a command writes a new or an empty folder;
- a non-empty folder is replaced only with ``--overwrite``, and never when it holds, anywhere
  inside, a megadmd run, a checkpoint, or a dataset written by another command, nor when it
  overlaps the command's own inputs;
- the resumable dataset writers (encode-text, encode-images, synth) continue their own output,
  finished or not, when it was started with the same settings (recorded in ``JOB_FILE``);
- ``megadmd train`` never deletes anything: it continues a run folder (under the rules of
  megadmd.safety.resume) or, with ``--overwrite``, adds a run to a folder of other files.

Every check here only reads (a writability probe aside); it runs before any work, and a refusal
is one ConfigError line.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ..config import ConfigError
from ..data.format import FORMAT_NAME, INDEX_FILE

JOB_FILE = ".megadmd-job.json"  # a resumable writer's command and settings
LOCK_FILE = ".megadmd.lock"  # megadmd train's run lock (safety/runlock.py)
MAX_SCAN_DEPTH = 5
MAX_SCAN_DIRS = 20000
# the writer of a dataset made before "written_by" was recorded, from the keys its writer put in "extra"
_LEGACY_WRITERS = (("images", "encode-images"), ("synth", "synth"), ("toy", "train"), ("text_encoder", "encode-text"))


@dataclass(frozen=True)
class Found:
    """Something megadmd made, found in a folder."""

    kind: str  # run | checkpoint | dataset | unfinished
    path: Path
    writer: Optional[str] = None  # a dataset's or an unfinished output's command

    @property
    def protected(self) -> bool:
        """Runs and checkpoints are never deleted by an output of another command."""
        return self.kind in ("run", "checkpoint")

    def __str__(self) -> str:
        by = f" written by 'megadmd {self.writer}'" if self.writer else ""
        return {"run": f"{self.path} is a megadmd training run",
                "checkpoint": f"{self.path} is a megadmd checkpoint",
                "dataset": f"{self.path} is a megadmd dataset{by}",
                "unfinished": f"{self.path} is an unfinished output of 'megadmd {self.writer}'"}[self.kind]


@dataclass(frozen=True)
class OutputTarget:
    path: Path
    action: str  # create (absent or empty) | replace (--overwrite) | resume (own output, same settings)

    @property
    def replace(self) -> bool:
        return self.action == "replace"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_run_folder(path: Path) -> bool:
    """A megadmd train output_dir: its lock file (made first), or its resolved config.json (with
    checkpoints/ or tensorboard/, or on its own when killed before either appeared)."""
    if (path / LOCK_FILE).is_file():
        return True
    if not (path / "config.json").is_file():
        return False
    if (path / "checkpoints").is_dir() or (path / "tensorboard").is_dir():
        return True
    cfg = _read_json(path / "config.json")
    return isinstance(cfg, dict) and {"dmd", "train", "checkpoint"} <= cfg.keys()


def dataset_writer(index: dict) -> Optional[str]:
    """The command that wrote a dataset, from its index.json; None if unknown."""
    extra = index.get("extra") if isinstance(index.get("extra"), dict) else {}
    if isinstance(extra.get("written_by"), str):
        return extra["written_by"]
    return next((cmd for key, cmd in _LEGACY_WRITERS if key in extra), None)


def find(path: Path) -> Optional[Found]:
    """What megadmd made in ``path`` itself (not below it), or None."""
    if (path / "manifest.json").is_file() or (path / "trainer_state.json").is_file():
        return Found("checkpoint", path)
    if is_run_folder(path):
        return Found("run", path)
    index = _read_json(path / INDEX_FILE)
    if isinstance(index, dict) and index.get("format") == FORMAT_NAME:
        return Found("dataset", path, dataset_writer(index))
    job = _read_json(path / JOB_FILE)
    if isinstance(job, dict):
        return Found("unfinished", path, str(job.get("command")))
    return None


def _first_protected(root: Path, command: str) -> Optional[str]:
    """The first thing at or below ``root`` that an ``--overwrite`` of ``command`` must not delete,
    as one line; None if there is none. Symbolic links are not followed (deleting a folder removes
    a link, never its target)."""
    stack = [(root, 0)]
    seen = 0
    while stack:
        folder, depth = stack.pop()
        found = find(folder)
        own = folder == root and found is not None and found.kind in ("dataset", "unfinished") \
            and found.writer == command
        if found is not None and not own:
            return str(found)
        try:
            subdirs = [Path(e.path) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
        except OSError as exc:
            return f"{folder} cannot be read ({exc.strerror}), so it cannot be checked"
        if subdirs and depth >= MAX_SCAN_DEPTH:
            return f"{root} is nested too deep to check that it holds no megadmd run"
        seen += len(subdirs)
        if seen > MAX_SCAN_DIRS:
            return f"{root} holds more than {MAX_SCAN_DIRS} folders, too many to check"
        stack.extend((s, depth + 1) for s in sorted(subdirs, reverse=True))
    return None


def _some_names(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_writable(path: Path, option: str) -> None:
    """``path`` (or, if absent, its nearest existing parent folder) accepts new files: probed by
    creating and removing a temporary file, which is what counts on network filesystems and for root."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{option} {path}: {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".megadmd-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write in {probe} ({exc.strerror}); choose a writable "
                          f"folder") from None


def check_not_input(path: Path, inputs: Iterable, option: str = "-o") -> None:
    """The output must neither be, hold, nor sit inside one of the command's inputs."""
    out = path.resolve()
    for given in inputs:
        if not given:
            continue
        src = Path(given).resolve()
        if out == src or out in src.parents or src in out.parents:
            raise ConfigError(f"{option} {path} overlaps the input {given}; write the output to another folder")


def content_sha256(path) -> str:
    """SHA-256 of a small input file (a prompt or image list): part of a resumable output's
    settings, so an edited list is not silently mixed into a half-written dataset."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _settings_change(path: Path, settings: dict) -> str:
    """'' if ``path``'s job file records ``settings``; otherwise what differs, for one line."""
    job = _read_json(path / JOB_FILE)
    old = job.get("settings") if isinstance(job, dict) else None
    if not isinstance(old, dict):
        return "its settings were not recorded"
    new = json.loads(json.dumps(settings))  # tuples -> lists, as stored
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def check_output(out, command: str, overwrite: bool, inputs: Iterable = (),
                 settings: Optional[dict] = None) -> OutputTarget:
    """May ``megadmd <command> -o out`` write ``out``? Raises ConfigError (one line) if not.

    ``settings``: for the resumable writers, what decides the output's content; their own output
    (finished or not) made with equal settings is continued rather than refused.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"-o {path} is a file, not a folder; give a folder path")
    found = find(path) if path.is_dir() else None
    own = found is not None and found.kind in ("dataset", "unfinished") and found.writer == command
    if found is not None and not own:
        raise ConfigError(f"-o {found}; megadmd never deletes that, even with --overwrite: choose a new folder")
    check_not_input(path, inputs)
    if not path.exists() or _is_empty_dir(path):
        check_writable(path, "-o")
        return OutputTarget(path, "create")
    if own and settings is not None:
        change = _settings_change(path, settings)
        if not change:
            check_writable(path, "-o")
            return OutputTarget(path, "resume")
        if not overwrite:
            raise ConfigError(f"-o {path} holds an output of 'megadmd {command}' made with other settings "
                              f"({change}); pass the same options to continue it, --overwrite to start it over, "
                              f"or choose a new folder")
    if not overwrite:
        what = str(found) if found else f"{path} is not empty ({_some_names(path)})"
        raise ConfigError(f"-o {what}; pass --overwrite to replace it, or choose a new folder")
    problem = _first_protected(path, command)
    if problem:
        raise ConfigError(f"-o {problem}; megadmd never deletes that, even with --overwrite: choose a new folder")
    check_writable(path.parent, "-o")
    return OutputTarget(path, "replace")


def begin_output(target: OutputTarget, command: str, settings: dict) -> None:
    """For the resumable writers (one process: rank 0): clear a replaced folder, create the folder
    and record the command and settings before the first shard is written."""
    from ..io_utils import atomic_write_text, remove_tree

    if target.replace:
        remove_tree(target.path)
    target.path.mkdir(parents=True, exist_ok=True)
    if target.action != "resume":
        job = {"command": command, "settings": settings}
        atomic_write_text(target.path / JOB_FILE, json.dumps(job, indent=1) + "\n")


def check_run_dir(out, overwrite: bool) -> bool:
    """May ``megadmd train`` use ``out`` as its output_dir? Returns whether it is already a run
    folder (whose checkpoints megadmd.safety.resume then rules on). Never deletes anything."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir {path} is a file, not a folder; give a folder path")
    found = find(path) if path.is_dir() else None
    if found is not None and found.kind == "checkpoint":
        raise ConfigError(f"output_dir {found}, not a run folder; give the run's folder (the one holding "
                          f"checkpoints/) or a new one")
    is_run = found is not None and found.kind == "run"
    if not is_run and path.is_dir() and any(path.iterdir()):
        what = str(found) if found else f"{path} is not empty ({_some_names(path)}) and is not a megadmd run"
        if not overwrite:
            raise ConfigError(f"output_dir {what}; pass --overwrite to add a run to it (nothing in it is deleted), "
                              f"or choose a new folder")
        if (path / "config.json").exists():  # the run's resolved config would replace it
            raise ConfigError(f"output_dir {path} holds a config.json that is not a megadmd run's, and the run "
                              f"writes its own there; move it away, or choose a new folder")
    check_writable(path, "output_dir")
    return is_run


def check_toy_data_dir(data: Path) -> None:
    """The built-in toy dataset goes to ``<output_dir>/data``: absent, empty, or the toy data of an
    earlier start of this run (then reused). Anything else there is the user's: refuse."""
    if not data.exists() or _is_empty_dir(data):
        return
    found = find(data) if data.is_dir() else None
    if found is not None and found.kind == "dataset" and found.writer == "train":
        return
    what = str(found) if found else f"{data} holds {_some_names(data)}" if data.is_dir() else f"{data} is a file"
    raise ConfigError(f"{what}, but the built-in toy dataset is written there; move it away, or give "
                      f"data.path to train on a dataset")
