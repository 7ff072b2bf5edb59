"""FastVideo parquet datasets read in place: the loader's batches equal those of the same samples in
megadmd's format; sample order, row-group reads, the index cache, latent statistics, bad files."""
import json

import pytest
import torch

from megadmd.config import ConfigError, DataConfig
from megadmd.data.format import dataset_format, open_dataset, write_negative
from megadmd.data.loader import BatchSource
from megadmd.interop import fastvideo_data as fv
from tests.helpers import TEST_LATENT_SHAPE, TEST_TEXT_DIM
from tests.helpers_fastvideo import (LATENTS_MEAN, LATENTS_STD, make_samples, write_fastvideo_dataset,
                                     write_megadmd_dataset, write_vae_config)

NEG = torch.randn(3, TEST_TEXT_DIM, generator=torch.Generator().manual_seed(7))


def _pair(tmp_path, kind, n=10, **layout):
    samples = make_samples(n, kind)
    parquet = write_fastvideo_dataset(tmp_path / "fv", samples, kind, **layout)
    ours = write_megadmd_dataset(tmp_path / "ours", samples, NEG, kind)
    fvd = open_dataset(parquet, negative_path=str(ours), latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    return samples, fvd, open_dataset(ours)


def _assert_same_batches(a, b, micro_batch, steps, dp=1):
    for rank in range(dp):
        sa = BatchSource(a, micro_batch=micro_batch, dp_rank=rank, dp_size=dp, seed=3)
        sb = BatchSource(b, micro_batch=micro_batch, dp_rank=rank, dp_size=dp, seed=3)
        assert torch.equal(sa.negative(2), sb.negative(2))
        for _ in range(steps):  # 10 samples, batch 2 x dp: several epochs
            x, y = sa.next(), sb.next()
            assert x.captions == y.captions and torch.equal(x.positions, y.positions)
            assert torch.equal(x.text_embeds, y.text_embeds) and torch.equal(x.text_mask, y.text_mask)
            for field in ("latents", "image_latents", "image_embeds"):
                u, v = getattr(x, field), getattr(y, field)
                assert (u is None and v is None) or torch.equal(u, v), field


@pytest.mark.parametrize("kind", ["t2v", "i2v", "text_only"])
def test_batches_equal_the_same_samples_in_our_format(tmp_path, kind):
    _, fvd, ours = _pair(tmp_path, kind)
    assert fvd.info.max_text_len == 512 and fvd.info.text_dim == TEST_TEXT_DIM and len(fvd) == 10
    assert fvd.info.latent_shape == (None if kind == "text_only" else TEST_LATENT_SHAPE)
    assert fvd.info.image_condition == ours.info.image_condition
    _assert_same_batches(fvd, ours, micro_batch=2, steps=12)
    _assert_same_batches(fvd, ours, micro_batch=1, steps=7, dp=2)
    s = fvd.get(0)
    assert s["text_embeds"].shape == (2, TEST_TEXT_DIM)  # stored trimmed; the loader pads to 512


def test_sample_order_is_sorted_file_names_then_rows(tmp_path):
    samples = make_samples(23, "t2v")
    root = write_fastvideo_dataset(tmp_path / "fv", samples, rows_per_file=2, workers=1)  # data_chunk_0..11
    names = fv.parquet_files(root)
    assert names[:4] == ["combined_parquet_dataset/worker_0/data_chunk_0.parquet",
                         "combined_parquet_dataset/worker_0/data_chunk_1.parquet",
                         "combined_parquet_dataset/worker_0/data_chunk_10.parquet",
                         "combined_parquet_dataset/worker_0/data_chunk_11.parquet"]
    ds = fv.FastVideoDataset(root, negative_path="", read_latents=False)
    # chunk_10 holds samples 20, 21 and sorts third, as in FastVideo's sorted(file paths)
    assert [ds.get(i)["caption"] for i in range(6)] == [f"prompt number {j}" for j in (0, 1, 2, 3, 20, 21)]


def test_a_row_group_is_read_once_for_its_rows(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    samples = make_samples(12, "t2v")
    root = write_fastvideo_dataset(tmp_path / "fv", samples, rows_per_file=6, row_group_size=3, workers=1)
    calls = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, **kw: calls.append(kw["columns"]) or real(self, g, **kw))
    ds = fv.FastVideoDataset(root, latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    calls.clear()
    for i in range(12):
        ds.get(i)
    assert len(calls) == 4  # 4 row groups of 3 rows
    assert all("pil_image_bytes" not in c for c in calls)
    text_only = fv.FastVideoDataset(root, read_latents=False)  # data-free mode: latents never read
    calls.clear()
    assert "latents" not in text_only.get(5)
    assert all("vae_latent_bytes" not in c for c in calls)


def test_the_index_is_cached_and_rebuilt_when_files_change(tmp_path, monkeypatch):
    root = write_fastvideo_dataset(tmp_path / "fv", make_samples(8, "t2v"))
    cache = tmp_path / "out" / "fastvideo_index.json"
    idx = fv.write_index(root, cache)
    assert [e[2] for e in idx["files"]] == [[4], [4]] and json.loads(cache.read_text()) == idx
    monkeypatch.setattr(fv, "build_index", lambda r: pytest.fail("the cache should have been used"))
    assert fv.load_index(root, cache) == idx
    monkeypatch.undo()
    write_fastvideo_dataset(tmp_path / "fv", make_samples(12, "t2v"), rows_per_file=6)  # same names, new sizes
    assert [e[2] for e in fv.load_index(root, cache)["files"]] == [[6], [6]]


def test_format_is_detected(tmp_path):
    root = write_fastvideo_dataset(tmp_path / "fv", make_samples(4, "t2v"))
    ours = write_megadmd_dataset(tmp_path / "ours", make_samples(4, "t2v"), NEG)
    assert dataset_format(root) == "fastvideo" and dataset_format(ours) == "megadmd"
    assert dataset_format(tmp_path / "empty") == "megadmd"  # read_index then names what is missing


def _bad(tmp_path, mutate, kind="t2v"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.helpers_fastvideo import fastvideo_row, fastvideo_schema

    rows = [fastvideo_row(i, s, kind) for i, s in enumerate(make_samples(3, kind))]
    schema = mutate(rows, fastvideo_schema(kind)) or fastvideo_schema(kind)
    folder = tmp_path / "bad"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "data_chunk_0.parquet")
    return folder


def test_bad_files_give_one_line_naming_file_and_field(tmp_path):
    def truncate(rows, schema):
        rows[1]["vae_latent_bytes"] = rows[1]["vae_latent_bytes"][:-4]

    root = _bad(tmp_path, truncate)
    ds = fv.FastVideoDataset(root, latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    ds.get(0)
    with pytest.raises(ConfigError) as err:
        ds.get(1)
    msg = str(err.value)
    assert str(root / "data_chunk_0.parquet") in msg and "row 1" in msg and "vae_latent_bytes holds 508 bytes but vae_latent_shape [4, 2, 4, 4] of float32 needs 512" in msg
    assert "\n" not in msg


def test_nan_and_missing_columns_are_named(tmp_path):
    import numpy as np
    import pyarrow as pa

    def nan(rows, schema):
        rows[2]["text_embedding_bytes"] = np.full(len(rows[2]["text_embedding_bytes"]) // 4, np.nan,
                                                  np.float32).tobytes()

    ds = fv.FastVideoDataset(_bad(tmp_path, nan), latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    with pytest.raises(ConfigError, match=r"row 2\): text_embedding_bytes holds NaN or Inf"):
        ds.get(2)

    def drop(rows, schema):
        for r in rows:
            del r["text_embedding_shape"]
        return pa.schema([f for f in schema if f.name != "text_embedding_shape"])

    (tmp_path / "bad").rename(tmp_path / "bad_nan")
    with pytest.raises(ConfigError, match=r"data_chunk_0.parquet: column 'text_embedding_shape' is missing"):
        fv.FastVideoDataset(_bad(tmp_path, drop))


def test_latent_statistics_sources(tmp_path):
    vae = write_vae_config(tmp_path / "vae")
    assert fv.latent_stats(str(vae), "", "tiny", 4)[1:] == (LATENTS_MEAN, LATENTS_STD)
    pipeline = tmp_path / "pipe"
    write_vae_config(pipeline / "vae")
    (pipeline / "model_index.json").write_text("{}")
    source, mean, _ = fv.latent_stats("", fv._pipeline_of(str(pipeline / "transformer")), "tiny", 4)
    assert source == str(pipeline / "vae" / "config.json") and mean == LATENTS_MEAN
    source, mean, std = fv.latent_stats("", "/models/Wan2.1-T2V-1.3B/transformer", "wan2.1-t2v-1.3b", 16)
    assert "Wan2.1 VAE constants of preset wan2.1-t2v-1.3b" in source
    import inspect

    from diffusers import AutoencoderKLWan

    sig = inspect.signature(AutoencoderKLWan.__init__).parameters  # diffusers' defaults are Wan2.1's VAE
    assert (mean, std) == (list(sig["latents_mean"].default), list(sig["latents_std"].default))
    assert len(fv.latent_stats("", "", "wan2.2-ti2v-5b", 48)[1]) == 48
    with pytest.raises(ConfigError, match="set data.vae_path to the Wan VAE folder"):
        fv.latent_stats("", "", "tiny", 4)
    with pytest.raises(ConfigError, match="for 16 channels but the dataset's latents have 48"):
        fv.latent_stats("", "", "wan2.1-t2v-14b", 48)


def test_preflight_options_need_a_negative_and_refuse_extras(tmp_path):
    root = write_fastvideo_dataset(tmp_path / "fv", make_samples(4, "t2v"))
    with pytest.raises(ConfigError, match="FastVideo datasets hold no negative-prompt embedding.*megadmd encode-text"):
        fv.fastvideo_options(DataConfig(path=str(root)), False, "", "tiny")
    write_negative(tmp_path / "neg", NEG, "blurry")
    data = DataConfig(path=str(root), negative_path=str(tmp_path / "neg"), vae_path=str(write_vae_config(tmp_path / "v")))
    info, options = fv.fastvideo_options(data, False, "", "tiny")
    assert info.latent_shape == TEST_LATENT_SHAPE and options["latents_mean"] == LATENTS_MEAN
    with pytest.raises(ConfigError, match="data.vae_path normalizes .* which this run does not read"):
        fv.fastvideo_options(data, True, "", "tiny")
    write_negative(tmp_path / "neg8", torch.zeros(2, 8), "")
    with pytest.raises(ConfigError, match=r"negative embedding is \[2, 8\] but dataset"):
        fv.fastvideo_options(DataConfig(path=str(root), negative_path=str(tmp_path / "neg8")), True, "", "tiny")


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_convert_gives_our_format_and_resumes(tmp_path, single_process_world, kind):
    from megadmd.data.format import LatentDataset, read_index

    samples, fvd, ours = _pair(tmp_path, kind, n=7)
    out = tmp_path / "converted"
    vae = str(write_vae_config(tmp_path / "vae"))
    info = fv.convert_dataset(str(tmp_path / "fv"), str(out), negative_path=str(tmp_path / "ours"), vae_path=vae,
                              shard_size=3)
    assert info.num_samples == 7 and [s["num_samples"] for s in info.shards] == [3, 3, 1]
    _assert_same_batches(LatentDataset(out), ours, micro_batch=2, steps=6)
    first = (out / "shard-000001.safetensors").read_bytes()
    (out / "shard-000001.safetensors").unlink()
    (out / "index.json").unlink()  # an interrupted run: resuming writes the missing shard only
    fv.convert_dataset(str(tmp_path / "fv"), str(out), negative_path=str(tmp_path / "ours"), vae_path=vae, shard_size=3)
    assert (out / "shard-000001.safetensors").read_bytes() == first and read_index(out).num_samples == 7
    with pytest.raises(ConfigError, match="already holds a dataset; pass --overwrite"):
        fv.convert_dataset(str(tmp_path / "fv"), str(out), negative_path=str(tmp_path / "ours"), vae_path=vae)
    fv.convert_dataset(str(tmp_path / "fv"), str(out), negative_path=str(tmp_path / "ours"), vae_path=vae,
                       shard_size=4, overwrite=True)
    assert [s["num_samples"] for s in read_index(out).shards] == [4, 3]
    assert not (out / "shard-000002.safetensors").exists()


def test_convert_command_refuses_without_a_negative_before_any_work(tmp_path):
    from click.testing import CliRunner

    from megadmd.cli import main

    root = write_fastvideo_dataset(tmp_path / "fv", make_samples(4, "t2v"))
    r = CliRunner().invoke(main, ["convert", "from-fastvideo-data", str(root), "-o", str(tmp_path / "out"),
                                  "--negative", str(tmp_path / "nothing"), "--preset", "wan2.1-t2v-1.3b"])
    assert r.exit_code == 2 and "megadmd: error: --negative: no negative.safetensors" in r.output
    assert not (tmp_path / "out").exists()
