"""FastVideo-schema parquet datasets for tests, and the same samples in megadmd's format.

The column lists follow FastVideo's ``fastvideo/dataset/dataloader/schema.py``
(``pyarrow_schema_t2v``, ``pyarrow_schema_i2v``, ``pyarrow_schema_text_only``), and the rows are
written as its preprocessing writes them: float32 ``tobytes()``, the VAE latent raw (not
normalized), the text embedding trimmed to its length, the I2V first-frame latent normalized,
the CLIP feature ``[N, D]``, one row group per ``data_chunk_<k>.parquet`` under ``worker_<w>/``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import TEST_LATENT_SHAPE, TEST_TEXT_DIM

LATENTS_MEAN = [0.5, -1.0, 0.25, 2.0]  # a 4-channel "VAE" for the test models
LATENTS_STD = [2.0, 0.5, 1.5, 4.0]
CLIP_SHAPE = [5, 16]


def _tensor_fields(name: str):
    import pyarrow as pa

    return [pa.field(f"{name}_bytes", pa.binary()), pa.field(f"{name}_shape", pa.list_(pa.int64())),
            pa.field(f"{name}_dtype", pa.string())]


def fastvideo_schema(kind: str):
    """FastVideo's arrow schema for ``kind`` in t2v | i2v | text_only."""
    import pyarrow as pa

    if kind == "text_only":
        return pa.schema([pa.field("id", pa.string()), *_tensor_fields("text_embedding"),
                          pa.field("caption", pa.string())])
    fields = [pa.field("id", pa.string()), *_tensor_fields("vae_latent"), *_tensor_fields("text_embedding")]
    if kind == "i2v":
        fields += [*_tensor_fields("clip_feature"), *_tensor_fields("first_frame_latent"),
                   *_tensor_fields("pil_image")]
    fields += [pa.field("file_name", pa.string()), pa.field("caption", pa.string()),
               pa.field("media_type", pa.string()), pa.field("width", pa.int64()), pa.field("height", pa.int64()),
               pa.field("num_frames", pa.int64()), pa.field("duration_sec", pa.float64()),
               pa.field("fps", pa.float64())]
    return pa.schema(fields)


def make_samples(n: int, kind: str = "t2v", seed: int = 0) -> list[dict]:
    """``n`` samples: raw latents, trimmed text embeddings of varying length, captions, and for
    I2V normalized first-frame latents and CLIP features."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        s = {"caption": f"prompt number {i}", "text": torch.randn(2 + (i * 3) % 5, TEST_TEXT_DIM, generator=g)}
        if kind != "text_only":
            s["latent"] = torch.randn(TEST_LATENT_SHAPE, generator=g) * 3 + 1
        if kind == "i2v":
            s["first_frame"] = torch.randn(TEST_LATENT_SHAPE, generator=g)
            s["clip"] = torch.randn(CLIP_SHAPE, generator=g)
        out.append(s)
    return out


def normalize(latent: torch.Tensor) -> torch.Tensor:
    c = latent.shape[0]
    return (latent - torch.tensor(LATENTS_MEAN).view(c, 1, 1, 1)) / torch.tensor(LATENTS_STD).view(c, 1, 1, 1)


def _tensor_cols(name: str, x: torch.Tensor) -> dict:
    a = x.float().numpy()
    return {f"{name}_bytes": a.tobytes(), f"{name}_shape": list(a.shape), f"{name}_dtype": str(a.dtype)}


def fastvideo_row(i: int, s: dict, kind: str) -> dict:
    row = {"id": f"video_{i}", "caption": s["caption"], **_tensor_cols("text_embedding", s["text"])}
    if kind == "text_only":
        return row
    row.update(_tensor_cols("vae_latent", s["latent"]))
    row.update(file_name=f"video_{i}", media_type="video", width=32, height=32, num_frames=5, duration_sec=0.3,
               fps=16.0)
    if kind == "i2v":
        row.update(_tensor_cols("clip_feature", s["clip"]))
        row.update(_tensor_cols("first_frame_latent", s["first_frame"]))
        row.update(pil_image_bytes=b"", pil_image_shape=[], pil_image_dtype="")
    return row


def write_fastvideo_dataset(root: Path, samples: list[dict], kind: str = "t2v", rows_per_file: int = 4,
                            row_group_size: int | None = None, workers: int = 2) -> Path:
    """Parquet files laid out as FastVideo's ParquetDatasetWriter does (``worker_<w>/
    data_chunk_<k>.parquet``), samples assigned so that sorted file names give sample order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = fastvideo_schema(kind)
    chunks = [samples[k:k + rows_per_file] for k in range(0, len(samples), rows_per_file)]
    per_worker = -(-len(chunks) // workers)
    first = 0
    for c, chunk in enumerate(chunks):
        w, k = divmod(c, per_worker)
        folder = root / "combined_parquet_dataset" / f"worker_{w}"
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist([fastvideo_row(first + j, s, kind) for j, s in enumerate(chunk)], schema=schema)
        pq.write_table(table, folder / f"data_chunk_{k}.parquet", compression="zstd",
                       row_group_size=row_group_size or len(chunk))
        first += len(chunk)
    return root


def write_megadmd_dataset(root: Path, samples: list[dict], negative: torch.Tensor, kind: str = "t2v",
                          shard_size: int = 3) -> Path:
    """The same samples in megadmd's format: latents normalized as the FastVideo reader does."""
    from megadmd.data.format import DatasetInfo, write_index, write_negative, write_shard

    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for k in range(0, len(samples), shard_size):
        chunk = samples[k:k + shard_size]
        extra = {}
        if kind == "i2v":
            extra = {"image_latents": torch.stack([s["first_frame"] for s in chunk]),
                     "image_embeds": torch.stack([s["clip"] for s in chunk])}
        shards.append(write_shard(
            root, k // shard_size, text_embeds=[s["text"] for s in chunk], captions=[s["caption"] for s in chunk],
            first_index=k, max_text_len=512, text_dim=TEST_TEXT_DIM,
            latents=torch.stack([normalize(s["latent"]) for s in chunk]) if kind != "text_only" else None, **extra))
    image = {"latent_shape": list(TEST_LATENT_SHAPE), "embed_shape": CLIP_SHAPE} if kind == "i2v" else None
    write_negative(root, negative, "blurry, static")
    write_index(root, DatasetInfo(num_samples=len(samples), text_dim=TEST_TEXT_DIM, max_text_len=512,
                                  shard_size=shard_size, shards=shards, image_condition=image,
                                  latent_shape=list(TEST_LATENT_SHAPE) if kind != "text_only" else None))
    return root


def write_vae_config(folder: Path) -> Path:
    """A VAE folder's config.json carrying only what the FastVideo reader needs."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "z_dim": 4,
                                                    "latents_mean": LATENTS_MEAN, "latents_std": LATENTS_STD}))
    return folder
