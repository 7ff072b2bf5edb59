"""Loader throughput: the same samples in megadmd's format and as FastVideo parquet read in place.

Writes ``--samples`` random samples (latent ``--latent-shape``, text 120 x 4096 tokens, as Wan's
UMT5 gives) once in megadmd's format and as FastVideo parquet files of ``--rows-per-file`` rows
each (one row group per file, as FastVideo's writer does), then times ``BatchSource.next()``
over a shuffled epoch for each, micro-batch 1 (FastVideo's DMD recipes), reading from the page
cache (the second pass; the first warms it). Prints samples/s and the ratio to megadmd's format.
Keep ``--samples`` at 16 or more times the largest ``--rows-per-file``: the reader keeps two
decoded row groups, and a real dataset is far larger than that.

    python tools/bench_data.py --samples 128 --latent-shape 16,5,28,52 --rows-per-file 1,4,8
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def _write(root: Path, n: int, shape: list, rows_per_file: list[int]) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megadmd.data.format import DatasetWriter

    g = torch.Generator().manual_seed(0)
    samples = [(torch.randn(shape, generator=g), torch.randn(120, 4096, generator=g)) for _ in range(n)]
    ours = DatasetWriter(root / "megadmd", text_dim=4096, max_text_len=512, shard_size=64, latent_shape=shape)
    for i, (lat, txt) in enumerate(samples):
        ours.add(txt, f"prompt {i}", lat)
    ours.finish(torch.zeros(8, 4096), "")
    paths = {"megadmd": root / "megadmd"}
    for r in rows_per_file:
        folder = root / f"fastvideo-{r}" / "worker_0"
        folder.mkdir(parents=True)
        for k in range(0, n, r):
            rows = [{"id": str(i), "caption": f"prompt {i}", "vae_latent_bytes": lat.numpy().tobytes(),
                     "vae_latent_shape": list(lat.shape), "vae_latent_dtype": "float32",
                     "text_embedding_bytes": txt.numpy().tobytes(), "text_embedding_shape": list(txt.shape),
                     "text_embedding_dtype": "float32"} for i, (lat, txt) in enumerate(samples[k:k + r], start=k)]
            pq.write_table(pa.Table.from_pylist(rows), folder / f"data_chunk_{k // r}.parquet", compression="zstd")
        paths[f"fastvideo, {r} rows per row group"] = folder.parent
    (root / "neg").mkdir()
    from megadmd.data.format import write_negative

    write_negative(root / "neg", torch.zeros(8, 4096), "")
    return paths


def _rate(path: Path, n: int, channels: int) -> float:
    from megadmd.data.format import open_dataset
    from megadmd.data.loader import BatchSource

    ds = open_dataset(path, negative_path=str(path.parent / "neg"), latents_mean=[0.0] * channels,
                      latents_std=[1.0] * channels)
    src = BatchSource(ds, micro_batch=1, dp_rank=0, dp_size=1, seed=1, text_len=512)
    for _ in range(n):  # warm the page cache and the decoders
        src.next()
    t0 = time.perf_counter()
    for _ in range(n):
        src.next()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--latent-shape", default="16,5,28,52")
    ap.add_argument("--rows-per-file", default="1,4,8")
    args = ap.parse_args()
    shape = [int(x) for x in args.latent_shape.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write(Path(tmp), args.samples, shape, [int(x) for x in args.rows_per_file.split(",")])
        rates = {name: _rate(p, args.samples, shape[0]) for name, p in paths.items()}
    mb = (torch.Size(shape).numel() + 120 * 4096) * 4 / 1e6
    print(f"{args.samples} samples of {mb:.2f} MB (latent {shape}, text 120 x 4096), micro-batch 1, shuffled")
    base = rates["megadmd"]
    for name, rate in rates.items():
        print(f"{name:40s} {rate:8.1f} samples/s  ({rate / base:.2f}x megadmd's format)")


if __name__ == "__main__":
    sys.exit(main())
