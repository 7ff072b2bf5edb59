"""Checkpoint manifests: every file's size and content hash, and the thread pool that hashes them.

``manifest.json`` (written last into a checkpoint, so its presence marks the save complete)::

    {"format": "megadmd-checkpoint-manifest", "version": 2, "hash": "xxh3-128-blocks-64MiB",
     "files": {"generator/zero/...optim_states.pt": {"bytes": 123, "hash": "..."}, ...}}

A file's hash is the XXH3-128 of the concatenated XXH3-128 digests of its 64 MiB blocks: one big
file (a rank's optimizer state) then hashes on several threads at once, at save and at load.
XXH3 (the ``xxhash`` package) rather than SHA-256: the hashes guard against damage (bit flips,
torn or truncated writes, a copy gone wrong), not against tampering, and it costs about a sixth
of SHA-256's CPU time (BENCHMARKS.md), which is what keeps a save from slowing down where the
cores are busy. Manifests of version 1 (``{"path": size}``, older megadmd) still load, checked by
size only.

Saving hashes in the background: each rank submits the files it wrote as soon as each role's
save returns, and the pool reads them back (from the page cache) while the next role is written;
the results are joined before the manifest is written and the checkpoint renamed into place
(megadmd/checkpoint.py). Loading spreads the files of a checkpoint over the ranks by size.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

import xxhash

MANIFEST = "manifest.json"
FORMAT = "megadmd-checkpoint-manifest"
VERSION = 2
BLOCK_BYTES = 64 << 20
HASH_NAME = "xxh3-128-blocks-64MiB"
_READ_BYTES = 8 << 20
_new_hash = xxhash.xxh3_128  # a module attribute, so tools/bench_checkpoint.py can time SHA-256 against it


def default_threads() -> int:
    """Hashing threads per process: the node's cores shared among the node's ranks, 1 to 8."""
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return max(1, min(8, (os.cpu_count() or 1) // max(1, local_ranks)))


def _block_digest(path: Path, index: int) -> bytes:
    h = _new_hash()
    buf = bytearray(_READ_BYTES)
    view = memoryview(buf)
    left = BLOCK_BYTES
    with open(path, "rb", buffering=0) as f:
        f.seek(index * BLOCK_BYTES)
        while left:
            n = f.readinto(view[: min(left, _READ_BYTES)])
            if not n:
                break
            h.update(view[:n])  # xxhash releases the GIL: the pool's threads hash in parallel
            left -= n
    return h.digest()


class Hasher:
    """Hash files under ``root`` on a thread pool while the caller goes on."""

    def __init__(self, root: Path, threads: Optional[int] = None):
        self.root = Path(root)
        self._pool = ThreadPoolExecutor(threads or default_threads(), thread_name_prefix="megadmd-hash")
        self._files: dict[str, tuple[int, list[Future]]] = {}

    def submit(self, path: Path) -> None:
        rel = Path(path).relative_to(self.root).as_posix()
        size = os.path.getsize(path)
        blocks = max(1, -(-size // BLOCK_BYTES))
        self._files[rel] = (size, [self._pool.submit(_block_digest, Path(path), i) for i in range(blocks)])

    def results(self) -> dict:
        """``{relative path: {"bytes", "hash"}}`` of every submitted file (waits; read errors raise)."""
        try:
            return {rel: {"bytes": size, "hash": _new_hash(b"".join(f.result() for f in futures)).hexdigest()}
                    for rel, (size, futures) in sorted(self._files.items())}
        finally:
            self._pool.shutdown(wait=True)


def hash_files(root: Path, rels: Iterable[str], threads: Optional[int] = None) -> dict:
    h = Hasher(root, threads)
    for rel in rels:
        h.submit(Path(root) / rel)
    return h.results()


def write_manifest(root: Path, hashed: dict, hash_rest: bool = True, threads: Optional[int] = None) -> None:
    """Write ``root/manifest.json``: ``hashed`` (files the ranks already hashed) plus every other
    file under ``root``, hashed here (``hash_rest=False``, for benchmarks: sizes only). Written
    atomically, and last."""
    from ..io_utils import atomic_write_text

    root = Path(root)
    rest = [f.relative_to(root).as_posix() for f in sorted(root.rglob("*"))
            if f.is_file() and f.name != MANIFEST and f.relative_to(root).as_posix() not in hashed]
    files = dict(hashed)
    if hash_rest:
        files.update(hash_files(root, rest, threads))
    else:
        files.update({rel: {"bytes": (root / rel).stat().st_size} for rel in rest})
    doc = {"format": FORMAT, "version": VERSION, "hash": HASH_NAME, "files": dict(sorted(files.items()))}
    atomic_write_text(root / MANIFEST, json.dumps(doc, indent=1) + "\n")


def read_manifest(root: Path) -> tuple[dict, bool]:
    """``({relative path: {"bytes"[, "hash"]}}, has content hashes)``; ValueError says what is wrong."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{Path(root).name} has no {MANIFEST} (its save did not finish)")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, OSError):
        raise ValueError(f"{Path(root).name}/{MANIFEST} is not valid JSON") from None
    if isinstance(doc, dict) and doc.get("format") == FORMAT:
        if doc.get("hash") != HASH_NAME:
            raise ValueError(f"{Path(root).name}/{MANIFEST} uses hash {doc.get('hash')!r}, which this megadmd "
                             f"does not know")
        return dict(doc["files"]), True
    if isinstance(doc, dict) and all(isinstance(v, int) for v in doc.values()):  # version 1: sizes only
        return {rel: {"bytes": size} for rel, size in doc.items()}, False
    raise ValueError(f"{Path(root).name}/{MANIFEST} is not a megadmd manifest")


def check_files(root: Path, files: dict, rels: Iterable[str], deep: bool = True,
                threads: Optional[int] = None) -> Optional[str]:
    """None if every file in ``rels`` has its recorded size (and, with ``deep``, content hash);
    otherwise what is wrong, naming the first bad file."""
    root = Path(root)
    rels = sorted(rels)
    for rel in rels:
        f = root / rel
        if not f.is_file():
            return f"{root.name}/{rel} is missing"
        size = f.stat().st_size
        if size != files[rel]["bytes"]:
            return f"{root.name}/{rel} has {size} bytes, expected {files[rel]['bytes']} (truncated or damaged)"
    hashed = [rel for rel in rels if "hash" in files[rel]]
    if not deep or not hashed:
        return None
    try:
        got = hash_files(root, hashed, threads)
    except OSError as exc:
        return f"{root.name}: a file cannot be read ({exc})"
    for rel in hashed:
        if got[rel]["hash"] != files[rel]["hash"]:
            return f"{root.name}/{rel} does not match its content hash (damaged on disk)"
    return None


def verify(root: Path, only: Optional[Iterable[str]] = None, deep: bool = True,
           threads: Optional[int] = None) -> Optional[str]:
    """None if the checkpoint at ``root`` is whole; otherwise what is wrong, naming the file.
    ``only``: check just the files whose relative path starts with one of these prefixes."""
    try:
        files, _ = read_manifest(root)
    except ValueError as exc:
        return str(exc)
    prefixes = tuple(only) if only is not None else ("",)
    return check_files(root, files, [rel for rel in files if rel.startswith(prefixes)], deep, threads)


def share_of(files: dict, rank: int, world: int) -> list[str]:
    """The files rank ``rank`` checks when ``world`` ranks verify together: largest first, each to
    the rank with the least bytes so far (the same answer on every rank)."""
    loads = [0] * world
    mine = []
    for rel, entry in sorted(files.items(), key=lambda kv: (-kv[1]["bytes"], kv[0])):
        r = min(range(world), key=lambda i: (loads[i], i))
        loads[r] += entry["bytes"]
        if r == rank:
            mine.append(rel)
    return mine
