"""The synthetic-latent dataset format: safetensors shards plus a JSON index.

A dataset is a folder::

    index.json                  written last; a folder without it is not a dataset
    negative.safetensors        the negative prompt's embedding (the unconditional input)
    shard-000000.safetensors    samples [0, shard_size)
    shard-000001.safetensors    samples [shard_size, 2 * shard_size)
    ...

Each shard holds stacked tensors for its samples:

    latents      [n, C, F, H, W]   clean (normalized) latents; absent in text-only datasets
    image_latents [n, C, F, H, W]  image-to-video only: the VAE latent of the first frame followed
                                   by zero frames, normalized (what Wan I2V models are given)
    image_embeds [n, N, D]         image-to-video only: CLIP image embedding (penultimate layer)
    text_embeds  [n, L, D]         text embeddings, zero-padded to the shard's longest (<= L_max)
    text_lens    [n]               int32, the unpadded length of each embedding (its mask)
    noise        [n, C, F, H, W]   optional (``megadmd synth --save-noise``): the starting noise each
                                   latent was sampled from by the teacher's ODE (index: "noise": true);
                                   ``dmd.regression`` trains on these (noise, latent) pairs

and, in the safetensors metadata under the single key ``megadmd``, a JSON object with ``captions``
(the prompts) and ``first_index``. (One key, because safetensors stores metadata as an unordered
map: with one key the file's bytes depend on its content only.)
``negative.safetensors`` holds ``text_embeds [L, D]`` and ``text_lens [1]``, with the negative
prompt in its metadata under ``caption``.

``index.json`` records the format name and version, the number of samples, the latent shape and
dtype, the text dimension and maximum length, and the shard list. Every file is written under a
temporary name and renamed into place, and the index comes last, so an interrupted write never
leaves a folder that passes for a whole dataset.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from ..config import ConfigError
from ..io_utils import atomic_write_bytes, atomic_write_text, open_safetensors

FORMAT_NAME = "megadmd-synthetic-latents"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
NEGATIVE_FILE = "negative.safetensors"


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.safetensors"


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in _DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"unsupported dtype {dtype}")


@dataclass
class DatasetInfo:
    """What ``index.json`` says about a dataset."""

    num_samples: int
    text_dim: int
    max_text_len: int
    shard_size: int
    latent_shape: Optional[list] = None  # [C, F, H, W]; None for text-only datasets
    latent_dtype: str = "float32"
    text_dtype: str = "float32"
    shards: list = field(default_factory=list)  # [{"file", "first_index", "num_samples"}]
    extra: dict = field(default_factory=dict)
    # image-to-video: {"latent_shape": [C, F, H, W], "embed_shape": [N, D]}, else None
    image_condition: Optional[dict] = None
    # shards also hold each latent's starting noise (an optional key: version 1 readers ignore it,
    # and datasets written before it read as without noise)
    has_noise: bool = False

    @property
    def has_latents(self) -> bool:
        return self.latent_shape is not None

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "num_samples": self.num_samples,
            "latent_shape": self.latent_shape,
            "latent_dtype": self.latent_dtype,
            "text_dim": self.text_dim,
            "max_text_len": self.max_text_len,
            "text_dtype": self.text_dtype,
            "shard_size": self.shard_size,
            "negative": NEGATIVE_FILE,
            "shards": self.shards,
            "image_condition": self.image_condition,
            "noise": self.has_noise,
            "extra": self.extra,
        }


def read_index(path: str | Path) -> DatasetInfo:
    """Read and check ``index.json``; raise ConfigError with one line on any problem."""
    root = Path(path)
    idx = root / INDEX_FILE
    if not root.is_dir():
        raise ConfigError(f"dataset folder not found: {root}")
    if not idx.is_file():
        raise ConfigError(f"{root} is not a megadmd dataset (no {INDEX_FILE}); write one with "
                          f"'megadmd make-dataset' or 'megadmd synth'")
    try:
        d = json.loads(idx.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"dataset index {idx} is not valid JSON: {exc}") from exc
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise ConfigError(f"dataset index {idx} is not a {FORMAT_NAME} index")
    if d.get("version") != FORMAT_VERSION:
        raise ConfigError(f"dataset {root} has format version {d.get('version')}; "
                          f"this megadmd reads version {FORMAT_VERSION}")
    try:
        info = DatasetInfo(
            num_samples=int(d["num_samples"]), text_dim=int(d["text_dim"]),
            max_text_len=int(d["max_text_len"]), shard_size=int(d["shard_size"]),
            latent_shape=d.get("latent_shape"), latent_dtype=d.get("latent_dtype", "float32"),
            text_dtype=d.get("text_dtype", "float32"), shards=list(d.get("shards", [])),
            extra=dict(d.get("extra", {})), image_condition=d.get("image_condition"),
            has_noise=bool(d.get("noise", False)),
        )
        counts = [int(s["num_samples"]) for s in info.shards]
        files = [str(s["file"]) for s in info.shards]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"dataset index {idx} is damaged: missing or bad entry {exc}; rewrite the dataset") from None
    if info.num_samples <= 0:
        raise ConfigError(f"dataset {root} is empty (0 samples)")
    if sum(counts) != info.num_samples:
        raise ConfigError(f"dataset index {idx} lists shards that do not add up to "
                          f"{info.num_samples} samples")
    if any(Path(f).name != f for f in files):
        raise ConfigError(f"dataset index {idx} names a shard outside its folder; rewrite the dataset")
    shape = info.latent_shape
    if shape is not None and not (isinstance(shape, list) and len(shape) == 4
                                  and all(isinstance(x, int) and x > 0 for x in shape)):
        raise ConfigError(f"dataset index {idx} has latent_shape {shape}, not [C, F, H, W]; rewrite the dataset")
    if info.latent_dtype not in _DTYPES or info.text_dtype not in _DTYPES:
        raise ConfigError(f"dataset index {idx} has dtypes {info.latent_dtype}/{info.text_dtype}; "
                          f"expected one of {', '.join(_DTYPES)}")
    return info


def encode_shard(
    text_embeds: torch.Tensor,
    text_lens: torch.Tensor,
    captions: list[str],
    first_index: int,
    latents: Optional[torch.Tensor] = None,
    extra_tensors: Optional[dict] = None,
) -> bytes:
    """Serialize one shard to safetensors bytes."""
    tensors = {"text_embeds": text_embeds.contiguous(), "text_lens": text_lens.to(torch.int32)}
    if latents is not None:
        tensors["latents"] = latents.contiguous()
    for k, v in (extra_tensors or {}).items():
        tensors[k] = v.contiguous()
    meta = {"megadmd": json.dumps({"captions": captions, "first_index": first_index})}
    return st_save(tensors, metadata=meta)


def shard_meta(handle) -> dict:
    """``{"captions": [...], "first_index": n}`` of an open shard."""
    return json.loads((handle.metadata() or {})["megadmd"])


def write_negative(root: Path, embed: torch.Tensor, caption: str) -> None:
    """Write the negative prompt's embedding ``[L, D]`` atomically."""
    data = st_save(
        {"text_embeds": embed.contiguous().float(), "text_lens": torch.tensor([embed.shape[0]], dtype=torch.int32)},
        metadata={"caption": caption},
    )
    atomic_write_bytes(root / NEGATIVE_FILE, data)


def write_index(root: Path, info: DatasetInfo) -> None:
    atomic_write_text(root / INDEX_FILE, json.dumps(info.to_json(), indent=1) + "\n")


def write_shard(root: Path, k: int, *, text_embeds: list, captions: list, first_index: int,
                max_text_len: int, text_dim: int, latents: Optional[torch.Tensor] = None,
                latent_dtype: torch.dtype = torch.float32, image_latents: Optional[torch.Tensor] = None,
                image_embeds: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None) -> dict:
    """Write shard ``k`` atomically from per-sample embeddings ``[L_i, D]``; return its index entry."""
    n = len(text_embeds)
    width = max(e.shape[0] for e in text_embeds)  # pad to the shard's longest, not the dataset's
    if width > max_text_len:
        raise ValueError(f"a text embedding has {width} tokens, more than max_text_len {max_text_len}")
    emb = torch.zeros(n, width, text_dim)
    lens = torch.zeros(n, dtype=torch.int32)
    for i, e in enumerate(text_embeds):
        emb[i, : e.shape[0]] = e.float()
        lens[i] = e.shape[0]
    lat = latents.to(latent_dtype) if latents is not None else None
    extra = {}
    if image_latents is not None:  # image-to-video condition (data/image.py)
        extra = {"image_latents": image_latents.float(), "image_embeds": image_embeds.float()}
    if noise is not None:  # the teacher's starting noise of each latent, at the latents' dtype
        extra["noise"] = noise.to(latent_dtype)
    atomic_write_bytes(Path(root) / shard_name(k),
                       encode_shard(emb, lens, list(captions), first_index, latents=lat, extra_tensors=extra))
    return {"file": shard_name(k), "first_index": first_index, "num_samples": n}


def existing_shard(root: Path, k: int) -> Optional[dict]:
    """The index entry of shard ``k`` if its file exists (files appear only when complete)."""
    f = Path(root) / shard_name(k)
    if not f.is_file():
        return None
    with open_safetensors(f, "shard (from an earlier run)") as h:
        first = int(shard_meta(h)["first_index"])
        n = int(h.get_slice("text_lens").get_shape()[0])
    return {"file": shard_name(k), "first_index": first, "num_samples": n}


def read_shard(root: Path, k: int) -> dict:
    """All tensors of shard ``k`` plus its captions (for tools that copy or transform shards)."""
    with safe_open(str(Path(root) / shard_name(k)), framework="pt") as h:
        out = {key: h.get_tensor(key) for key in h.keys()}
        out["captions"] = shard_meta(h)["captions"]
    return out


class DatasetWriter:
    """Write a dataset shard by shard; ``finish()`` writes the index last.

    Samples are buffered until a shard is full. Shard k always holds samples
    ``[k * shard_size, (k + 1) * shard_size)``, which is what makes interrupted writes resumable.
    """

    def __init__(self, root: str | Path, *, text_dim: int, max_text_len: int, shard_size: int = 256,
                 latent_shape: Optional[list] = None, latent_dtype: torch.dtype = torch.float32,
                 extra: Optional[dict] = None, with_noise: bool = False):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.info = DatasetInfo(
            num_samples=0, text_dim=text_dim, max_text_len=max_text_len, shard_size=shard_size,
            latent_shape=list(latent_shape) if latent_shape is not None else None,
            latent_dtype=dtype_name(latent_dtype), extra=dict(extra or {}), has_noise=with_noise,
        )
        if with_noise and latent_shape is None:
            raise ValueError("a dataset with starting noise needs latents (noise has their shape)")
        self._latent_dtype = latent_dtype
        self._buf: list[tuple] = []

    def add(self, text_embed: torch.Tensor, caption: str = "", latents: Optional[torch.Tensor] = None,
            noise: Optional[torch.Tensor] = None) -> None:
        if text_embed.ndim != 2 or text_embed.shape[1] != self.info.text_dim:
            raise ValueError(f"text embedding must be [L, {self.info.text_dim}], got {list(text_embed.shape)}")
        if text_embed.shape[0] > self.info.max_text_len:
            raise ValueError(f"text embedding has {text_embed.shape[0]} tokens, more than the "
                             f"dataset's max_text_len {self.info.max_text_len}")
        if self.info.has_latents:
            if latents is None or list(latents.shape) != self.info.latent_shape:
                raise ValueError(f"latents must be {self.info.latent_shape}, got "
                                 f"{None if latents is None else list(latents.shape)}")
        if self.info.has_noise and (noise is None or list(noise.shape) != self.info.latent_shape):
            raise ValueError(f"a dataset with noise needs noise of shape {self.info.latent_shape} with each latent")
        self._buf.append((text_embed, caption, latents, noise))
        if len(self._buf) == self.info.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        first = self.info.num_samples
        lat = torch.stack([b[2] for b in self._buf]) if self.info.has_latents else None
        noise = torch.stack([b[3] for b in self._buf]) if self.info.has_noise else None
        entry = write_shard(self.root, first // self.info.shard_size, text_embeds=[b[0] for b in self._buf],
                            captions=[b[1] for b in self._buf], first_index=first,
                            max_text_len=self.info.max_text_len, text_dim=self.info.text_dim, latents=lat,
                            latent_dtype=self._latent_dtype, noise=noise)
        self.info.shards.append(entry)
        self.info.num_samples += entry["num_samples"]
        self._buf = []

    def finish(self, negative_embed: torch.Tensor, negative_caption: str = "") -> DatasetInfo:
        self._flush()
        if self.info.num_samples == 0:
            raise ValueError("refusing to write an empty dataset")
        if negative_embed.ndim != 2 or negative_embed.shape[1] != self.info.text_dim:
            raise ValueError(f"negative embedding must be [L, {self.info.text_dim}]")
        write_negative(self.root, negative_embed, negative_caption)
        write_index(self.root, self.info)
        return self.info


class LatentDataset:
    """Random access to a dataset folder. Shards are opened lazily and kept open."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.info = read_index(self.root)
        self._starts = [s["first_index"] for s in self.info.shards]
        self._handles: dict[int, object] = {}
        self._caption_cache: dict[int, list] = {}
        for s in self.info.shards:
            if not (self.root / s["file"]).is_file():
                raise ConfigError(f"dataset {self.root} is missing its shard {s['file']}")
        if not (self.root / NEGATIVE_FILE).is_file():
            raise ConfigError(f"dataset {self.root} has no {NEGATIVE_FILE} (the negative prompt's embedding)")

    def __len__(self) -> int:
        return self.info.num_samples

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        import bisect

        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def _handle(self, k: int):
        h = self._handles.get(k)
        if h is None:
            h = open_shard(self.root, self.info, self.info.shards[k])
            self._handles[k] = h
        return h

    def _captions(self, k: int, handle) -> list:
        if k not in self._caption_cache:
            self._caption_cache[k] = shard_meta(handle)["captions"]
        return self._caption_cache[k]

    def get(self, i: int) -> dict:
        """One sample: ``text_embeds [L_max, D]``, ``text_len``, ``caption`` and ``latents`` if present."""
        k, j = self._locate(i)
        h = self._handle(k)
        out = {
            "text_embeds": h.get_slice("text_embeds")[j : j + 1][0].float(),
            "text_len": int(h.get_slice("text_lens")[j : j + 1][0]),
            "caption": self._captions(k, h)[j],
        }
        if self.info.has_latents:
            out["latents"] = h.get_slice("latents")[j : j + 1][0].float()
        if self.info.has_noise:
            out["noise"] = h.get_slice("noise")[j : j + 1][0].float()
        if self.info.image_condition is not None:
            out["image_latents"] = h.get_slice("image_latents")[j : j + 1][0].float()
            out["image_embeds"] = h.get_slice("image_embeds")[j : j + 1][0].float()
        return out

    def negative(self) -> tuple[torch.Tensor, str]:
        """The negative prompt's embedding ``[L, D]`` (unpadded) and its text."""
        check_negative(self.root, self.info)
        with safe_open(str(self.root / NEGATIVE_FILE), framework="pt") as f:
            emb = f.get_tensor("text_embeds").float()
            n = int(f.get_tensor("text_lens")[0])
            return emb[:n], (f.metadata() or {}).get("caption", "")


def dataset_format(path: str | Path, fmt: str = "auto") -> str:
    """``megadmd`` (a folder with index.json) or ``fastvideo`` (a folder of parquet files)."""
    if fmt != "auto":
        return fmt
    root = Path(path)
    if (root / INDEX_FILE).is_file():
        return "megadmd"
    from ..interop.fastvideo_data import is_fastvideo_dataset

    return "fastvideo" if is_fastvideo_dataset(root) else "megadmd"  # read_index names what is missing


def open_dataset(path: str | Path, fmt: str = "auto", **fastvideo_options):
    """Random access to a dataset in our format, or to a FastVideo parquet dataset read in place
    (``interop/fastvideo_data.py``; ``fastvideo_options`` go to it). Both have ``info``, ``len``,
    ``get(i)`` and ``negative()``."""
    if dataset_format(path, fmt) == "fastvideo":
        from ..interop.fastvideo_data import FastVideoDataset

        return FastVideoDataset(path, **fastvideo_options)
    return LatentDataset(path)
# ----------------------------------------------------------------------------------------------
# Checks of a dataset's files against its index: every shard when training starts (preflight),
# and each shard again when the loader opens it. Headers only (and the small text_lens tensor):
# shapes, dtypes and sample counts, so a damaged or mismatched shard gives one line naming it
# rather than a traceback or a silent run on the wrong data. Non-finite values inside tensors
# are the training guard's job (dmd/guard.py): finding them here would read every byte.

_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _expect(path: Path, handle, key: str, shape: list, dtype: str) -> list:
    """Check tensor ``key``'s shape (``None`` entries: any size) and dtype; return its shape."""
    if key not in handle.keys():
        raise ConfigError(f"dataset file {path} has no '{key}' tensor, which index.json implies; rewrite the dataset")
    sl = handle.get_slice(key)
    got, got_dtype = list(sl.get_shape()), sl.get_dtype()
    if len(got) != len(shape) or any(e is not None and e != g for e, g in zip(shape, got)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
        raise ConfigError(f"dataset file {path}: '{key}' has shape {got}, index.json says {want}; "
                          f"rewrite the dataset or fix index.json")
    if got_dtype != dtype:
        raise ConfigError(f"dataset file {path}: '{key}' is {got_dtype}, index.json says {dtype}; "
                          f"rewrite the dataset or fix index.json")
    return got


def check_shard(root: Path, info: DatasetInfo, entry: dict, handle) -> None:
    """One open shard against its index entry and the dataset's index (one line on a mismatch)."""
    path = Path(root) / entry["file"]
    n = int(entry["num_samples"])
    text = _expect(path, handle, "text_embeds", [n, None, info.text_dim], _ST_DTYPES[info.text_dtype])
    if not 1 <= text[1] <= info.max_text_len:
        raise ConfigError(f"dataset shard {path}: text embeddings of {text[1]} tokens, index.json allows "
                          f"1 to {info.max_text_len}; rewrite the dataset")
    _expect(path, handle, "text_lens", [n], "I32")
    if info.has_latents:
        _expect(path, handle, "latents", [n, *info.latent_shape], _ST_DTYPES[info.latent_dtype])
    if info.image_condition is not None:
        _expect(path, handle, "image_latents", [n, *info.image_condition["latent_shape"]], "F32")
        _expect(path, handle, "image_embeds", [n, *info.image_condition["embed_shape"]], "F32")
    try:
        meta = shard_meta(handle)
        captions, first = meta["captions"], int(meta["first_index"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError):
        raise ConfigError(f"dataset shard {path} has no readable megadmd metadata; rewrite the dataset") from None
    if len(captions) != n or first != int(entry["first_index"]):
        raise ConfigError(f"dataset shard {path} holds {len(captions)} captions from sample {first}, index.json "
                          f"says {n} from sample {entry['first_index']}; rewrite the dataset or fix index.json")
    lens = handle.get_tensor("text_lens")
    if bool(((lens < 1) | (lens > text[1])).any()):
        raise ConfigError(f"dataset shard {path}: text_lens outside [1, {text[1]}] (damaged); rewrite the dataset")


def open_shard(root: Path, info: DatasetInfo, entry: dict):
    """An open, checked shard (a safetensors handle)."""
    handle = open_safetensors(Path(root) / entry["file"], "dataset shard")
    check_shard(root, info, entry, handle)
    return handle


def check_negative(root: Path, info: DatasetInfo) -> None:
    path = Path(root) / NEGATIVE_FILE
    with open_safetensors(path, "dataset negative-prompt file") as h:
        _expect(path, h, "text_embeds", [None, info.text_dim], "F32")
        _expect(path, h, "text_lens", [1], "I32")


def check_dataset_files(root: str | Path, info: DatasetInfo) -> None:
    """Every shard and the negative-prompt file of a dataset against its index."""
    for entry in info.shards:
        with open_shard(Path(root), info, entry):
            pass
    check_negative(Path(root), info)
