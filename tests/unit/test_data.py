"""The dataset format, its writer and reader, and the training loader's sharding."""
import pytest
import torch

from megadmd.config import ConfigError
from megadmd.data.format import DatasetWriter, LatentDataset, read_index
from megadmd.data.loader import BatchSource, pad_text
from megadmd.data.make import write_random_dataset


def _write(root, n=10, shard=4, latents=True):
    w = DatasetWriter(root, text_dim=3, max_text_len=5, shard_size=shard,
                      latent_shape=[2, 1, 2, 2] if latents else None)
    for i in range(n):
        w.add(torch.full((1 + i % 5, 3), float(i)), f"caption {i}",
              torch.full((2, 1, 2, 2), float(i)) if latents else None)
    w.finish(torch.ones(2, 3), "bad quality")
    return root


def test_write_and_read_back(tmp_path):
    ds = LatentDataset(_write(tmp_path / "d"))
    assert len(ds) == 10
    assert [s["file"] for s in ds.info.shards] == ["shard-000000.safetensors", "shard-000001.safetensors",
                                                   "shard-000002.safetensors"]
    s = ds.get(7)
    assert s["caption"] == "caption 7"
    assert s["text_len"] == 3
    assert torch.equal(s["text_embeds"][:3], torch.full((3, 3), 7.0))
    assert torch.equal(s["text_embeds"][3:], torch.zeros(2, 3))
    assert torch.equal(s["latents"], torch.full((2, 1, 2, 2), 7.0))
    neg, text = ds.negative()
    assert neg.shape == (2, 3) and text == "bad quality"


def test_text_only_dataset(tmp_path):
    ds = LatentDataset(_write(tmp_path / "d", latents=False))
    assert not ds.info.has_latents and "latents" not in ds.get(0)


def test_folder_without_index_is_not_a_dataset(tmp_path):
    root = tmp_path / "d"
    w = DatasetWriter(root, text_dim=3, max_text_len=5, shard_size=2, latent_shape=[2, 1, 2, 2])
    for i in range(3):
        w.add(torch.ones(2, 3), "", torch.ones(2, 1, 2, 2))
    # crashed before finish(): a shard exists but no index
    assert (root / "shard-000000.safetensors").exists()
    with pytest.raises(ConfigError, match="not a megadmd dataset"):
        read_index(root)


def test_empty_dataset_is_refused(tmp_path):
    w = DatasetWriter(tmp_path / "d", text_dim=3, max_text_len=5)
    with pytest.raises(ValueError, match="empty"):
        w.finish(torch.ones(1, 3))


def test_random_dataset_is_atomic_and_shaped(tmp_path):
    info = write_random_dataset(tmp_path / "r", num_samples=5, latent_shape=[4, 2, 4, 4], text_len=6,
                                text_dim=8)
    assert info.num_samples == 5 and read_index(tmp_path / "r").latent_shape == [4, 2, 4, 4]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_pad_text():
    e, m = pad_text(torch.ones(2, 3), 4)
    assert e.shape == (4, 3) and m.tolist() == [True, True, False, False]
    e, m = pad_text(torch.ones(6, 3), 4)  # cropped
    assert e.shape == (4, 3) and m.all()


def _positions(src, steps):
    out = []
    for _ in range(steps):
        b = src.next()
        out.append(b.positions.tolist())
    return out


def test_loader_shards_by_dp_rank_and_matches_a_bigger_batch(tmp_path):
    ds = LatentDataset(_write(tmp_path / "d"))
    one = BatchSource(ds, micro_batch=2, dp_rank=0, dp_size=1, seed=3)
    r0 = BatchSource(ds, micro_batch=1, dp_rank=0, dp_size=2, seed=3)
    r1 = BatchSource(ds, micro_batch=1, dp_rank=1, dp_size=2, seed=3)
    for _ in range(12):  # crosses epoch boundaries (10 samples)
        b, b0, b1 = one.next(), r0.next(), r1.next()
        assert b.positions.tolist() == b0.positions.tolist() + b1.positions.tolist()
        assert torch.equal(b.latents, torch.cat([b0.latents, b1.latents]))
        assert b.captions == b0.captions + b1.captions


def test_loader_epochs_are_permutations_and_resume(tmp_path):
    ds = LatentDataset(_write(tmp_path / "d"))
    src = BatchSource(ds, micro_batch=5, dp_rank=0, dp_size=1, seed=1)
    epoch = [c for _ in range(2) for c in src.next().captions]
    assert sorted(epoch) == sorted(f"caption {i}" for i in range(10))
    state = src.state_dict()
    following = src.next().captions
    again = BatchSource(ds, micro_batch=5, dp_rank=0, dp_size=1, seed=1)
    again.load_state_dict(state)
    assert again.next().captions == following


def test_negative_embedding_is_padded_like_the_batch(tmp_path):
    ds = LatentDataset(_write(tmp_path / "d"))
    src = BatchSource(ds, micro_batch=2, dp_rank=0, dp_size=1, seed=1)
    neg = src.negative(2)
    assert neg.shape == (2, 5, 3)
    assert torch.equal(neg[0, :2], torch.ones(2, 3)) and torch.equal(neg[0, 2:], torch.zeros(3, 3))


def test_an_empty_dataset_fails_preflight_clearly(tmp_path, test_model_dir):
    import json

    from megadmd.config import resolve
    from megadmd.preflight import preflight_train

    root = _write(tmp_path / "d")
    idx = json.loads((root / "index.json").read_text())
    idx.update(num_samples=0, shards=[])
    (root / "index.json").write_text(json.dumps(idx))
    cfg = resolve(overrides=[f"data.path={root}", f"model.teacher_path={test_model_dir}", f"output_dir={tmp_path / 'o'}"])
    with pytest.raises(ConfigError, match=r"is empty \(0 samples\)"):
        preflight_train(cfg, 1)
    assert not (tmp_path / "o").exists()


def test_latent_channels_that_do_not_fit_the_model_fail_preflight(tmp_path, test_model_dir):
    from megadmd.config import resolve
    from megadmd.preflight import preflight_train

    data = write_random_dataset(tmp_path / "d16", num_samples=2, latent_shape=[16, 2, 4, 4], text_len=4, text_dim=32)
    assert data.latent_shape[0] == 16
    cfg = resolve(overrides=[f"data.path={tmp_path / 'd16'}", f"model.teacher_path={test_model_dir}",
                             f"output_dir={tmp_path / 'o'}"])
    with pytest.raises(ConfigError, match="has 16-channel latents but the model predicts 4 channels"):
        preflight_train(cfg, 1)
