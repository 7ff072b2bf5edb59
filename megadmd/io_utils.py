"""Atomic file and folder writes: a crash never leaves a half-written file that passes for whole.

Everything is written under a temporary name in the destination's own folder, flushed to disk,
then renamed into place (``os.replace`` is atomic on POSIX within one filesystem). Reading
text and safetensors files with one-line errors for bad ones lives here too.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        # Some filesystems (several network mounts among them) refuse fsync on a directory. The
        # rename is still atomic there; only its durability across a power cut is weaker.
        pass
    finally:
        os.close(fd)


def read_text_utf8(path: str | os.PathLike, what: str) -> str:
    """A text file's contents, or one ConfigError line saying it is not UTF-8 (and where)."""
    from .config import ConfigError

    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def open_safetensors(path: str | os.PathLike, what: str):
    """A safetensors file opened for reading (header parsed; safetensors also refuses a file
    shorter than its header says), or one ConfigError line naming it: truncated, overwritten
    header, missing. The handle reads tensors lazily (memory-mapped)."""
    from safetensors import SafetensorError, safe_open

    from .config import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} is missing")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{what} {path} is damaged or truncated ({str(exc).splitlines()[0]})") from None


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file next to ``path``; on success rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    import torch

    with atomic_file(path, "wb") as f:
        torch.save(obj, f)


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name; rename it to ``path`` only if the block succeeds.

    ``path`` may be absent or an empty folder. A non-empty ``path`` is replaced only with
    ``replace=True`` (a command's ``--overwrite``, after megadmd.safety.folders has checked that it
    holds nothing that must never be deleted); otherwise the new folder is discarded and
    ConfigError raised, so something that appeared while the command ran is never lost.
    """
    from .config import ConfigError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.is_dir() and any(path.iterdir()):
            if not replace:
                raise ConfigError(f"{path} was created by something else while this command ran; it was left "
                                  f"as it is and nothing was written (rerun with a new output folder)")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "replaced")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if path.is_dir():
                path.rmdir()  # empty: rename(2) would replace it too, but not on every filesystem
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a folder by first renaming it aside (atomic), so a crash never leaves it half deleted."""
    path = Path(path)
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.replace(path, aside / "removed")
    shutil.rmtree(aside, ignore_errors=True)
