"""FastVideo's preprocessed parquet datasets, read in place with ``LatentDataset``'s interface.

FastVideo (``fastvideo/dataset/dataloader/schema.py``) stores one sample per parquet row, each
tensor as three columns ``<name>_bytes`` (raw little-endian bytes), ``<name>_shape`` (list of
int64) and ``<name>_dtype`` (a numpy dtype name):

    text-only  id, text_embedding_*, caption                      (data-free training)
    T2V        + vae_latent_* [C, T, H, W], file_name, media_type, width, height, num_frames, ...
    I2V        + clip_feature_* [N, D], first_frame_latent_* [C, T, H, W], pil_image_*

How FastVideo writes and reads them, and what we do the same way:
- ``vae_latent`` is the VAE posterior mean, stored raw: FastVideo normalizes it at load time
  with the Wan VAE's per-channel ``latents_mean`` / ``latents_std``, and so do we,
  ``(x - mean) / std`` in float32 (``latent_stats`` says where the constants come from).
- ``first_frame_latent`` (the VAE latent of "first frame, then black frames") is stored already
  normalized; it is our ``image_latents``. ``clip_feature`` is the output of a CLIP vision model
  cut to its first 31 layers, i.e. the penultimate hidden state: our ``image_embeds``.
- ``text_embedding`` is the UMT5 output trimmed to its valid length; FastVideo zero-pads (or
  crops) it to 512 tokens with a mask, as our loader does with ``max_text_len`` 512.
- FastVideo decodes every ``*_bytes`` as float32 and ignores ``*_dtype``; we honour ``*_dtype``
  (float32, float16, bfloat16) and check that the byte count fits the shape.
- the dataset has no negative-prompt embedding (FastVideo encodes it online at start-up): the
  caller gives one (``data.negative_path``).

Sample order: parquet files sorted by their path relative to the root (FastVideo sorts full
paths, the same order), then row groups, then rows. The loader's stream is keyed by this index,
so a resumed run reads exactly the samples it would have.

Speed: parquet compresses a row group's column as one chunk, so a single row cannot be read on
its own. Each read fetches one row group's needed columns only (never ``pil_image``; no latents
in data-free mode) and keeps the last few decoded row groups in a small LRU. FastVideo writes one
row group per file of ``samples_per_file`` rows (8 in its published scripts), so a random sample
costs at most that many rows' bytes; ``tools/bench_data.py`` measures it against our format.
The per-file row counts come from the parquet footers once and are cached (``write_index``).
``convert_dataset`` (``megadmd convert from-fastvideo-data``) copies a dataset into our format,
same samples in the same order, for runs long enough to want our format's reading speed.
"""
from __future__ import annotations

import bisect
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import ConfigError
from ..data.format import DatasetInfo

INDEX_FORMAT = "megadmd-fastvideo-index"
TEXT_LEN = 512  # FastVideo's text_padding_length (the UMT5 text_len)
TEXT = ("text_embedding",)
T2V = TEXT + ("vae_latent",)
I2V = T2V + ("clip_feature", "first_frame_latent")

# Per-channel statistics of the Wan VAEs (as in their diffusers vae/config.json). Wan2.1's VAE
# (16 channels) serves every Wan2.1 model and Wan2.2-A14B; Wan2.2's (48 channels) serves TI2V-5B.
WAN21_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916]
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667]
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]
PRESET_VAE_STATS = {
    "wan2.1-t2v-1.3b": ("Wan2.1 VAE", WAN21_LATENTS_MEAN, WAN21_LATENTS_STD),
    "wan2.1-t2v-14b": ("Wan2.1 VAE", WAN21_LATENTS_MEAN, WAN21_LATENTS_STD),
    "wan2.2-t2v-a14b": ("Wan2.1 VAE", WAN21_LATENTS_MEAN, WAN21_LATENTS_STD),
    "wan2.2-ti2v-5b": ("Wan2.2 VAE", WAN22_LATENTS_MEAN, WAN22_LATENTS_STD),
}
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("reading a FastVideo parquet dataset needs pyarrow: pip install 'megadmd[fastvideo]'") from None
    return pq


def parquet_files(root: Path) -> list[str]:
    """Every ``*.parquet`` below ``root``, as sorted POSIX paths relative to it."""
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(".parquet"):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def is_fastvideo_dataset(path: str | Path) -> bool:
    root = Path(path)
    return root.is_dir() and not (root / "index.json").is_file() and bool(parquet_files(root))


# ---------------------------------------------------------------------------------------------
# Schema and index


def _schema_kind(schema, file: str) -> tuple:
    """The tensors a file's arrow schema holds (TEXT, T2V or I2V), after checking their columns."""
    import pyarrow as pa

    names = set(schema.names)
    kind = I2V if {"clip_feature_bytes", "first_frame_latent_bytes"} <= names else (
        T2V if "vae_latent_bytes" in names else TEXT)
    for tensor in kind:
        for suffix, ok, what in (("bytes", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "binary"),
                                 ("shape", lambda t: pa.types.is_list(t) and pa.types.is_integer(t.value_type),
                                  "a list of integers"),
                                 ("dtype", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string")):
            col = f"{tensor}_{suffix}"
            if col not in names:
                raise ConfigError(f"FastVideo dataset file {file}: column '{col}' is missing (FastVideo's schema "
                                  f"stores each tensor as {tensor}_bytes, _shape and _dtype)")
            if not ok(schema.field(col).type):
                raise ConfigError(f"FastVideo dataset file {file}: column '{col}' is {schema.field(col).type}, "
                                  f"expected {what}")
    return kind


def build_index(root: Path) -> dict:
    """File list, row-group sizes and schema kind, from the parquet footers (no data is read)."""
    pq = _pq()
    files = parquet_files(root)
    if not files:
        raise ConfigError(f"no .parquet files under {root}: not a FastVideo preprocessed dataset")
    entries, kind = [], None
    for rel in files:
        path = root / rel
        try:
            meta = pq.ParquetFile(path).metadata
            schema = meta.schema.to_arrow_schema()
        except Exception as exc:  # pyarrow's errors for a damaged footer; say which file
            raise ConfigError(f"FastVideo dataset file {path} is not a readable parquet file: "
                              f"{str(exc).splitlines()[0]}") from exc
        k = _schema_kind(schema, str(path))
        if kind is None:
            kind = k
        elif k[:len(kind)] != kind:
            raise ConfigError(f"FastVideo dataset file {path} holds {', '.join(k)} but {root / files[0]} holds "
                              f"{', '.join(kind)}; one dataset must use one schema")
        entries.append([rel, path.stat().st_size, [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]])
    return {"format": INDEX_FORMAT, "version": 1, "root": str(root.resolve()), "kind": list(kind), "files": entries}


def load_index(root: Path, cache: Optional[Path] = None) -> dict:
    """The index, from ``cache`` when it describes the same files (names and sizes), else built."""
    if cache is not None and cache.is_file():
        try:
            idx = json.loads(cache.read_text())
        except json.JSONDecodeError:
            idx = None
        files = parquet_files(root)
        if (idx and idx.get("format") == INDEX_FORMAT and idx.get("root") == str(root.resolve())
                and [e[0] for e in idx["files"]] == files
                and all((root / e[0]).stat().st_size == e[1] for e in idx["files"])):
            return idx
    return build_index(root)


def describe_index(idx: dict) -> str:
    """One log line about an index, with the reading cost of its row groups."""
    groups = [n for e in idx["files"] for n in e[2]]
    text = (f"{len(idx['files'])} files, {sum(groups)} samples, schema {'+'.join(idx['kind'])}, "
            f"up to {max(groups, default=0)} rows per row group")
    if max(groups, default=0) > 1:
        text += ("; each sample read decompresses its whole row group, so for long runs 'megadmd convert "
                 "from-fastvideo-data' makes a copy that reads at megadmd's speed (BENCHMARKS.md)")
    return text


def write_index(root: str | Path, cache: Path) -> dict:
    """Build (or check) the index once and save it where every rank then reads it."""
    from ..io_utils import atomic_write_text

    idx = load_index(Path(root), cache)
    atomic_write_text(cache, json.dumps(idx) + "\n")
    return idx


# ---------------------------------------------------------------------------------------------
# Latent statistics and the negative prompt


def _stats_from_config(path: Path) -> Optional[tuple]:
    for cand in (path, path / "config.json", path / "vae" / "config.json"):
        if cand.is_file() and cand.suffix == ".json":
            cfg = json.loads(cand.read_text())
            if "latents_mean" in cfg and "latents_std" in cfg:
                return str(cand), list(cfg["latents_mean"]), list(cfg["latents_std"])
    return None


def latent_stats(vae_path: str, teacher_path: str, preset: str, channels: int) -> tuple:
    """``(source, latents_mean, latents_std)`` to normalize raw FastVideo latents with. In order:
    ``data.vae_path`` (a VAE folder, its config.json, or a pipeline folder with ``vae/``); the
    teacher's pipeline folder's ``vae/config.json``; the Wan VAE constants of a Wan preset."""
    if vae_path:
        found = _stats_from_config(Path(vae_path))
        if found is None:
            raise ConfigError(f"data.vae_path {vae_path}: no config.json with latents_mean and latents_std "
                              f"(give an AutoencoderKLWan folder, its config.json, or a pipeline folder with vae/)")
    else:
        teacher_vae = Path(teacher_path) / "vae" / "config.json" if teacher_path else None
        found = _stats_from_config(teacher_vae) if teacher_vae is not None and teacher_vae.is_file() else None
        if found is None and preset in PRESET_VAE_STATS:
            found = PRESET_VAE_STATS[preset]
            found = (f"the {found[0]} constants of preset {preset}", found[1], found[2])
    if found is None:
        raise ConfigError("FastVideo stores raw VAE latents, normalized at load time with the VAE's "
                          "latents_mean/latents_std: set data.vae_path to the Wan VAE folder (or use a teacher "
                          "pipeline folder with vae/, or a wan preset)")
    source, mean, std = found
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(f"{source} has latents_mean/latents_std for {len(mean)} channels but the dataset's latents "
                          f"have {channels}; set data.vae_path to the VAE that encoded them")
    if min(std) <= 0:
        raise ConfigError(f"{source}: latents_std must be positive")
    return source, mean, std


def read_negative(path: str | Path, key: str = "data.negative_path") -> tuple[torch.Tensor, str]:
    """``[L, D]`` embedding and prompt text from a ``negative.safetensors`` (or a megadmd dataset
    folder holding one), as ``megadmd encode-text`` writes it."""
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = p / "negative.safetensors"
    if not p.is_file():
        raise ConfigError(f"{key}: no negative.safetensors at {p}")
    with safe_open(str(p), framework="pt") as f:
        if "text_embeds" not in f.keys():
            raise ConfigError(f"{key}: {p} has no 'text_embeds' tensor")
        emb = f.get_tensor("text_embeds").float()
        n = int(f.get_tensor("text_lens")[0]) if "text_lens" in f.keys() else emb.shape[0]
        return emb[:n], (f.metadata() or {}).get("caption", "")


NEGATIVE_HELP = ("FastVideo datasets hold no negative-prompt embedding (FastVideo encodes it at start-up): set "
                 "data.negative_path to the negative.safetensors that 'megadmd encode-text --prompts p.txt "
                 "--negative-prompt \"...\" --text-encoder <Wan pipeline> -o neg' writes into neg/")


def probe(root: str | Path, first: Optional[str] = None) -> DatasetInfo:
    """What the first row of the first non-empty file says (schema, text dimension, latent and
    image shapes), without indexing the folder: ``num_samples`` is 0 here."""
    pq = _pq()
    root = Path(root)
    for rel in ([first] if first else parquet_files(root)):
        pf = pq.ParquetFile(root / rel)
        if pf.metadata.num_rows:
            break
    else:
        raise ConfigError(f"FastVideo dataset {root} has no rows (no non-empty .parquet file)")
    kind = _schema_kind(pf.schema_arrow, str(root / rel))
    g = next(g for g in range(pf.metadata.num_row_groups) if pf.metadata.row_group(g).num_rows)
    table = pf.read_row_group(g, columns=[f"{t}_shape" for t in kind])
    shapes = {t: [int(x) for x in (table.column(f"{t}_shape")[0].as_py() or [])] for t in kind}
    if len(shapes["text_embedding"]) not in (2, 3):
        raise ConfigError(f"FastVideo dataset file {root / rel}: text_embedding_shape is {shapes['text_embedding']}, "
                          f"expected [L, D]")
    image = None
    if "clip_feature" in kind:
        image = {"latent_shape": shapes["first_frame_latent"], "embed_shape": shapes["clip_feature"][-2:]}
    schema = "i2v" if image else ("t2v" if "vae_latent" in kind else "text_only")
    return DatasetInfo(num_samples=0, text_dim=shapes["text_embedding"][-1], max_text_len=TEXT_LEN, shard_size=0,
                       latent_shape=shapes.get("vae_latent"), image_condition=image,
                       extra={"format": "fastvideo", "schema": schema, "kind": list(kind)})


# ---------------------------------------------------------------------------------------------
# The dataset


class FastVideoDataset:
    """Random access to a FastVideo parquet folder with ``LatentDataset``'s interface: ``info``,
    ``len``, ``get(i)`` and ``negative()``. ``latent_stats_source`` only names where the statistics
    came from (preflight's options are passed whole)."""

    def __init__(self, root: str | Path, *, negative_path: str = "", latents_mean: Optional[list] = None,
                 latents_std: Optional[list] = None, index_cache: Optional[Path] = None, read_latents: bool = True,
                 cached_row_groups: int = 2, latent_stats_source: str = ""):
        self.root = Path(root)
        idx = load_index(self.root, index_cache)
        self.kind = tuple(idx["kind"])
        self._files = [e[0] for e in idx["files"]]
        self._groups = [(f, g) for f, e in enumerate(idx["files"]) for g in range(len(e[2]))]
        sizes = [n for e in idx["files"] for n in e[2]]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = max(1, cached_row_groups)
        self.read_latents = read_latents and "vae_latent" in self.kind
        self._negative = negative_path
        if not self._starts[-1]:
            raise ConfigError(f"FastVideo dataset {self.root} has no rows")
        self.info = probe(self.root, next(e[0] for e in idx["files"] if sum(e[2])))
        self.info.num_samples = self._starts[-1]
        self.latent_shape = self.info.latent_shape
        self._mean = self._std = None
        if self.read_latents:
            if latents_mean is None or latents_std is None:
                raise ConfigError(f"FastVideo dataset {self.root} holds raw VAE latents: give latents_mean/latents_std")
            c = self.latent_shape[0]
            self._mean = torch.tensor(latents_mean, dtype=torch.float32).view(c, 1, 1, 1)
            self._std = torch.tensor(latents_std, dtype=torch.float32).view(c, 1, 1, 1)

    def __len__(self) -> int:
        return self.info.num_samples

    # --- reading ---------------------------------------------------------------------------
    def _columns(self) -> list:
        tensors = [t for t in self.kind if t != "vae_latent" or self.read_latents]
        return [f"{t}_{s}" for t in tensors for s in ("bytes", "shape", "dtype")] + ["caption"]

    def _row_group(self, j: int):
        table = self._cache.get(j)
        if table is None:
            f, g = self._groups[j]
            path = self.root / self._files[f]
            try:
                table = _pq().ParquetFile(path).read_row_group(g, columns=self._columns())
            except ConfigError:
                raise
            except Exception as exc:
                raise ConfigError(f"FastVideo dataset file {path}: row group {g} cannot be read: "
                                  f"{str(exc).splitlines()[0]}") from exc
            self._cache[j] = table
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(j)
        return table

    def _decode(self, table, r: int, tensor: str, where: str) -> torch.Tensor:
        shape = [int(x) for x in table.column(f"{tensor}_shape")[r].as_py()]
        dtype = (table.column(f"{tensor}_dtype")[r].as_py() or "float32").replace("torch.", "")
        buf = table.column(f"{tensor}_bytes")[r].as_buffer()
        if buf is None or buf.size == 0:
            raise ConfigError(f"{where}: {tensor}_bytes is empty")
        n = math.prod(shape)
        if dtype == "bfloat16":
            item = 2
        elif dtype in _NP_DTYPES:
            item = np.dtype(_NP_DTYPES[dtype]).itemsize
        else:
            raise ConfigError(f"{where}: {tensor}_dtype is '{dtype}'; FastVideo stores float32")
        if buf.size != n * item:
            raise ConfigError(f"{where}: {tensor}_bytes holds {buf.size} bytes but {tensor}_shape {shape} of "
                              f"{dtype} needs {n * item}")
        if dtype == "bfloat16":
            arr = torch.frombuffer(bytearray(buf), dtype=torch.bfloat16).float()
        else:
            arr = torch.from_numpy(np.frombuffer(buf, dtype=_NP_DTYPES[dtype]).astype(np.float32))
        # one float64 reduction finds any NaN or Inf: finite float32 values cannot overflow it
        if not math.isfinite(float(arr.sum(dtype=torch.float64))):
            raise ConfigError(f"{where}: {tensor}_bytes holds NaN or Inf values")
        return arr.reshape(shape)

    def _checked(self, x: torch.Tensor, expected: list, tensor: str, where: str) -> torch.Tensor:
        if list(x.shape) != list(expected):
            raise ConfigError(f"{where}: {tensor}_shape is {list(x.shape)} but the dataset's first row has "
                              f"{list(expected)}; every sample must have the same shape")
        return x

    def get(self, i: int) -> dict:
        """One sample: ``text_embeds [L, D]``, ``text_len``, ``caption``, and (normalized)
        ``latents`` / ``image_latents`` / ``image_embeds`` where the schema has them."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        j = bisect.bisect_right(self._starts, i) - 1
        r = i - self._starts[j]
        table = self._row_group(j)
        f, g = self._groups[j]
        where = f"FastVideo dataset file {self.root / self._files[f]} (row group {g}, row {r})"
        text = self._decode(table, r, "text_embedding", where)
        if text.ndim == 3 and text.shape[0] == 1:
            text = text[0]  # some preprocessing versions keep a batch dimension of 1
        if text.ndim != 2 or text.shape[1] != self.info.text_dim:
            raise ConfigError(f"{where}: text_embedding_shape is {list(text.shape)}, expected [L, {self.info.text_dim}]")
        out = {"text_embeds": text, "text_len": int(text.shape[0]),
               "caption": table.column("caption")[r].as_py() or ""}
        if self.read_latents:
            lat = self._checked(self._decode(table, r, "vae_latent", where), self.latent_shape, "vae_latent", where)
            out["latents"] = (lat - self._mean) / self._std
        if self.info.image_condition is not None:
            cond = self.info.image_condition
            out["image_latents"] = self._checked(self._decode(table, r, "first_frame_latent", where),
                                                 cond["latent_shape"], "first_frame_latent", where)
            emb = self._decode(table, r, "clip_feature", where)
            out["image_embeds"] = self._checked(emb.reshape(emb.shape[-2:]) if emb.ndim == 3 and emb.shape[0] == 1
                                                else emb, cond["embed_shape"], "clip_feature", where)
        return out

    def negative(self) -> tuple[torch.Tensor, str]:
        if not self._negative:
            raise ConfigError(NEGATIVE_HELP)
        emb, caption = read_negative(self._negative)
        if emb.ndim != 2 or emb.shape[1] != self.info.text_dim:
            raise ConfigError(f"data.negative_path: the negative embedding is {list(emb.shape)} but the dataset's "
                              f"text embeddings have dimension {self.info.text_dim}")
        return emb, caption


def fastvideo_options(data, simulate: bool, teacher_path: str, preset: str) -> tuple[DatasetInfo, dict]:
    """Preflight for a FastVideo dataset (``data`` is ``cfg.data``): what it holds, and the
    ``FastVideoDataset`` options (negative prompt, latent statistics) the run will open it with.
    In data-free mode (``simulate``) its latents are never read, so no statistics are needed."""
    info = probe(data.path)
    if not data.negative_path:
        raise ConfigError(NEGATIVE_HELP)
    emb, _ = read_negative(data.negative_path)
    if emb.ndim != 2 or emb.shape[1] != info.text_dim:
        raise ConfigError(f"data.negative_path: the negative embedding is {list(emb.shape)} but dataset {data.path} "
                          f"has text embeddings of dimension {info.text_dim}")
    options = {"negative_path": data.negative_path, "read_latents": info.has_latents and not simulate}
    if options["read_latents"]:
        pipeline = _pipeline_of(teacher_path)
        source, mean, std = latent_stats(data.vae_path, pipeline, preset, info.latent_shape[0])
        options.update(latents_mean=mean, latents_std=std, latent_stats_source=source)
    elif data.vae_path:
        raise ConfigError("data.vae_path normalizes a FastVideo dataset's latents, which this run does not read "
                          "(data-free mode or a text-only dataset); remove it")
    return info, options


def _pipeline_of(teacher_path: str) -> str:
    """The pipeline folder a teacher path belongs to: itself, or the parent of its transformer/."""
    p = Path(teacher_path) if teacher_path else None
    if p is not None and not (p / "vae").is_dir() and (p.parent / "model_index.json").is_file():
        return str(p.parent)
    return teacher_path


COMMAND = "convert from-fastvideo-data"


def convert_dataset(src: str, out: str, *, negative_path: str, vae_path: str = "", preset: str = "",
                    shard_size: int = 256, overwrite: bool = False) -> DatasetInfo:
    """``megadmd convert from-fastvideo-data``: a FastVideo parquet dataset copied into megadmd's
    format, for datasets whose large row groups make in-place reading slow. Shard k holds samples
    ``[k S, (k + 1) S)`` in the in-place reader's order, so both train on the same stream.
    Collective when launched on several ranks: shard k goes to rank k % world, shards already
    written are skipped (an interrupted run resumes), rank 0 writes the index last."""
    import torch.distributed as dist

    from ..data.format import existing_shard, write_index, write_negative
    from ..parallel.init import init_distributed

    from ..safety.folders import begin_output, check_output

    root = Path(out)
    if shard_size <= 0:
        raise ConfigError("--shard-size must be positive")
    # The same rules as every folder-writing command (megadmd/safety/folders.py): an unfinished or
    # finished conversion with equal settings is continued, anything else needs --overwrite, and
    # a run or another command's dataset is never deleted.
    settings = {"source": str(Path(src).resolve()), "negative": str(Path(negative_path).resolve()) if negative_path
                else "", "vae": vae_path, "preset": preset, "shard_size": shard_size}
    target = check_output(root, COMMAND, overwrite, inputs=[src, negative_path or None, vae_path or None],
                          settings=settings)
    info = probe(src)
    negative, caption = read_negative(negative_path, "--negative") if negative_path else (None, "")
    if negative is None or negative.shape[-1] != info.text_dim:
        raise ConfigError(NEGATIVE_HELP.replace("data.negative_path", "--negative") if negative is None else
                          f"--negative: the embedding is {list(negative.shape)}, the dataset's text dimension "
                          f"is {info.text_dim}")
    stats = latent_stats(vae_path, "", preset, info.latent_shape[0]) if info.has_latents else ("", None, None)
    proc = init_distributed()
    if proc.rank == 0:
        begin_output(target, COMMAND, settings)
    dist.barrier()
    ds = FastVideoDataset(src, negative_path=negative_path, latents_mean=stats[1], latents_std=stats[2])
    n = len(ds)
    num_shards = -(-n // shard_size)
    for k in range(proc.rank, num_shards, proc.world_size):
        if existing_shard(root, k) is None:
            samples = [ds.get(i) for i in range(k * shard_size, min(n, (k + 1) * shard_size))]
            _write_converted_shard(root, k, k * shard_size, samples, info.text_dim)
    dist.barrier()
    result = DatasetInfo(num_samples=n, text_dim=info.text_dim, max_text_len=TEXT_LEN, shard_size=shard_size,
                         latent_shape=info.latent_shape, image_condition=info.image_condition,
                         shards=[existing_shard(root, k) for k in range(num_shards)],
                         extra={"converted_from": "fastvideo", "source": str(src), "latent_stats": stats[0],
                                "written_by": COMMAND})
    if proc.rank == 0:
        write_negative(root, negative, caption)
        write_index(root, result)
    dist.barrier()
    return result


def _write_converted_shard(root: Path, k: int, first: int, samples: list, text_dim: int) -> None:
    from ..data.format import write_shard

    image = {}
    if "image_latents" in samples[0]:
        image = {"image_latents": torch.stack([s["image_latents"] for s in samples]),
                 "image_embeds": torch.stack([s["image_embeds"] for s in samples])}
    latents = torch.stack([s["latents"] for s in samples]) if "latents" in samples[0] else None
    write_shard(root, k, text_embeds=[s["text_embeds"][:TEXT_LEN] for s in samples],  # FastVideo crops at 512
                captions=[s["caption"] for s in samples], first_index=first, max_text_len=TEXT_LEN,
                text_dim=text_dim, latents=latents, **image)
