"""A dataset's files against its index.json: shapes, dtypes, sample counts, damaged and
truncated files -- each one line naming the file, when training starts and when a shard opens."""
import pytest
import torch

from megadmd.config import ConfigError
from megadmd.data.format import DatasetWriter, LatentDataset, check_dataset_files, read_index
from tests.helpers import DATASET_DAMAGE, TEST_LATENT_SHAPE, save_test_dataset


def _open_for_training(root):
    info = read_index(root)
    check_dataset_files(root, info)
    ds = LatentDataset(root)
    ds.get(0)
    ds.negative()


def test_an_intact_dataset_passes(tmp_path):
    _open_for_training(save_test_dataset(tmp_path / "ds", num_samples=16))


def test_bf16_latents_pass_when_the_index_says_bfloat16(tmp_path):
    w = DatasetWriter(tmp_path / "bf16", text_dim=32, max_text_len=6, latent_shape=TEST_LATENT_SHAPE,
                      latent_dtype=torch.bfloat16)
    for _ in range(3):
        w.add(torch.randn(4, 32), "x", torch.randn(*TEST_LATENT_SHAPE))
    w.finish(torch.randn(6, 32))
    _open_for_training(tmp_path / "bf16")


@pytest.mark.parametrize("how", sorted(DATASET_DAMAGE))
def test_damage_is_one_line_naming_the_file(tmp_path, how):
    root = save_test_dataset(tmp_path / "ds", num_samples=16)
    damage, message = DATASET_DAMAGE[how]
    damage(root)
    with pytest.raises(ConfigError, match=message) as err:
        _open_for_training(root)
    assert "\n" not in str(err.value)


def test_a_shard_is_checked_when_the_loader_opens_it(tmp_path):
    """The dataset was fine when opened; its shard changed before the loader first read it."""
    root = save_test_dataset(tmp_path / "ds", num_samples=16)
    ds = LatentDataset(root)
    damage, message = DATASET_DAMAGE["int32 latents"]
    damage(root)
    with pytest.raises(ConfigError, match=message):
        ds.get(3)
