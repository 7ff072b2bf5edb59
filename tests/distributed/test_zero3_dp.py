"""2 gloo ranks against 1: ZeRO-3 really partitions, and training matches at the same global batch."""
import pytest
import torch

from tests.distributed.workers import train_and_record
from tests.helpers import assert_same_training, spawn


def _overrides(tmp_path, model_dir, data_dir, micro_batch, name):
    return [f"model.teacher_path={model_dir}", f"data.path={data_dir}", f"output_dir={tmp_path / name}",
            f"train.micro_batch_size={micro_batch}", "train.max_steps=6", "logging.interval_steps=1",
            "logging.tensorboard=false", "dmd.generator_update_interval=2",
            "optim.generator.lr=1e-3", "optim.fake_score.lr=1e-3",
            # partition every parameter, however small, so the test sees the split
            "deepspeed.generator=tests/distributed/zero3_partition_all.json",
            "deepspeed.fake_score=tests/distributed/zero3_partition_all.json"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, test_model_dir, test_dataset_dir):
    tmp = tmp_path_factory.mktemp("dp")
    one, two = tmp / "one.pt", tmp / "two.pt"
    spawn(train_and_record, 1, _overrides(tmp, test_model_dir, test_dataset_dir, 2, "one"), str(one))
    spawn(train_and_record, 2, _overrides(tmp, test_model_dir, test_dataset_dir, 1, "two"), str(two))
    return torch.load(one, weights_only=False), torch.load(two, weights_only=False)


def test_zero3_partitions_parameters_and_optimizer_state(runs):
    _, two = runs
    for role in ("generator", "fake_score"):
        per_rank = [s[role] for s in two["sizes"]]
        total = per_rank[0]["total"]
        for s in per_rank:
            # each rank holds about half (partitions are padded to equal size)
            assert 0.45 * total <= s["local"] <= 0.55 * total, (role, s)
            assert 0.45 * total <= s["optimizer_fp32_local"] <= 0.55 * total, (role, s)
            assert 0.45 * total <= s["adam_local"] <= 0.55 * total, (role, s)
        assert sum(s["local"] for s in per_rank) >= total


def test_two_ranks_match_one_rank_at_the_same_global_batch(runs):
    one, two = runs
    assert [s for s, _ in one["history"]] == list(range(1, 7))
    assert_same_training(one, two)
    # and training did something
    assert any("loss/generator" in v for _, v in one["history"])


def test_data_free_on_two_dp_ranks_matches_one_rank(tmp_path, test_model_dir):
    """Data-free simulation runs the same number of generator forwards on every rank (ZeRO-3
    gathers are collective), and dp=2 x b=1 equals dp=1 x b=2. The two ranks also fetch whole
    blocks (deepspeed.leaf_blocks), with the one-step regression in the generator's exit call and
    the GAN term (its head in the fake score's one call; the generator's GAN loss through the
    frozen fake score's leaf blocks)."""
    from tests.helpers import save_test_dataset

    data = save_test_dataset(tmp_path / "pairs", num_samples=8, with_noise=True)
    common = [f"model.teacher_path={test_model_dir}", f"data.path={data}", "train.max_steps=4",
              "logging.interval_steps=1", "logging.tensorboard=false", "dmd.generator_update_interval=2",
              "dmd.simulate_generator_forward=true", "dmd.regression.weight=1.0", "dmd.regression.num_steps=1",
              "optim.generator.lr=1e-3", "optim.fake_score.lr=1e-3", "dmd.gan.enabled=true", "dmd.gan.hidden_dim=8",
              # Adam's default eps (1e-8) turns a gradient element near 0 into a whole lr step of
              # either sign, so rounding in the dp reduction moved one generator weight by 2.7e-5
              # (the rest by < 1e-6); at 1e-4 small gradients step in proportion, as SGD would
              "optim.generator.eps=1e-4", "optim.fake_score.eps=1e-4"]
    spawn(train_and_record, 1, common + [f"output_dir={tmp_path / 'a'}", "train.micro_batch_size=2",
                                         "dmd.regression.batch_size=4"], str(tmp_path / "a.pt"))
    spawn(train_and_record, 2, common + [f"output_dir={tmp_path / 'b'}", "train.micro_batch_size=1",
                                         "dmd.regression.batch_size=2", "deepspeed.leaf_blocks=true"],
          str(tmp_path / "b.pt"))
    a, b = torch.load(tmp_path / "a.pt", weights_only=False), torch.load(tmp_path / "b.pt", weights_only=False)
    assert sum("loss/generator_regression" in v and "loss/generator_gan" in v for _, v in a["history"]) == 2
    for (_, va), (_, vb) in zip(a["history"], b["history"], strict=True):
        for k in ("loss/fake_score", "loss/discriminator", "loss/generator", "loss/generator_regression",
                  "loss/generator_gan"):
            if k in va:
                assert va[k] == pytest.approx(vb[k], rel=1e-4), k
    for role in ("generator", "fake_score"):
        worst = max(float((a["states"][role][k] - b["states"][role][k]).abs().max()) for k in a["states"][role])
        assert worst < 2e-5, (role, worst)
