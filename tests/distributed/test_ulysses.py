"""Ulysses sequence parallelism on 2 gloo ranks equals the single-process model."""
import pytest
import torch

from tests.distributed.workers import train_and_record, ulysses_forward_backward
from tests.helpers import spawn


@pytest.mark.parametrize("latent_shape, tokens, vsa_sparsity", [
    ([4, 2, 4, 4], 8, 0.0),
    ([4, 3, 6, 2], 9, 0.0),
    # VSA after the all-to-all: a 5 x 6 x 7 grid (partial edge cubes, 8 cubes), top-4 selection
    ([4, 5, 12, 14], 210, 0.5),
])
def test_sp2_forward_and_every_gradient_match_sp1(tmp_path, latent_shape, tokens, vsa_sparsity):
    out = tmp_path / "r.pt"
    spawn(ulysses_forward_backward, 2, latent_shape, str(out), vsa_sparsity)
    r = torch.load(out, weights_only=False)
    assert r["layouts_ok"]  # all-to-all: sequence-sharded <-> head-sharded, both ways
    assert r["seq_len"] == tokens  # 9 tokens do not divide by 2: padded, then unpadded
    assert torch.allclose(r["sp_out"], r["ref_out"], atol=1e-5, rtol=0)
    assert r["ref_grads"].keys() == r["sp_avg_grads"].keys()
    for name, ref in r["ref_grads"].items():
        got = r["sp_avg_grads"][name]
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), (name, float((got - ref).abs().max()))


def _train_overrides(tmp, model_dir, data_dir, name, sp, mode):
    common = [f"model.teacher_path={model_dir}", f"data.path={data_dir}", f"output_dir={tmp / name}",
              "train.micro_batch_size=2", "train.max_steps=4", "logging.interval_steps=1",
              "logging.tensorboard=false", "dmd.generator_update_interval=2", f"parallel.sp_size={sp}",
              "optim.generator.lr=1e-3", "optim.fake_score.lr=1e-3"]
    if mode == "data_free":  # backward simulation: the sp ranks must draw the same noise; with the
        # regression's chain from stored noise and the GAN head judging at its own timesteps
        return common + ["dmd.simulate_generator_forward=true", "data.latent_shape=[4,3,6,2]",
                         "dmd.regression.weight=1.0", "dmd.gan.enabled=true", "dmd.gan.hidden_dim=16",
                         "dmd.gan.generator_weight=0.1", "dmd.gan.discriminator_weight=0.1"]
    # both phases, and the GAN head pooling tokens that are sharded over the sp group
    return common + ["dmd.gan.enabled=true", "dmd.gan.hidden_dim=16", "dmd.gan.generator_weight=0.1",
                     "dmd.gan.discriminator_weight=0.1"]


@pytest.mark.parametrize("mode", ["synthetic_gan", "data_free"])
def test_sp2_training_matches_sp1_on_the_same_data(tmp_path, test_model_dir, mode):
    from tests.helpers import save_test_dataset

    data = save_test_dataset(tmp_path / "data", num_samples=8, latent_shape=[4, 3, 6, 2],  # 9 tokens
                             with_noise=mode == "data_free")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    spawn(train_and_record, 1, _train_overrides(tmp_path, test_model_dir, data, "sp1", 1, mode), str(one))
    spawn(train_and_record, 2, _train_overrides(tmp_path, test_model_dir, data, "sp2", 2, mode), str(two))
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    gan = ("loss/discriminator", "gan/accuracy_real", "gan/logit_fake")
    assert [s for s, _ in a["history"]] == [s for s, _ in b["history"]] and a["history"]
    for (_, va), (_, vb) in zip(a["history"], b["history"]):
        keys = ("loss/fake_score", "grad_norm/fake_score") + gan
        if "loss/generator" in va:
            keys += ("loss/generator", "grad_norm/generator", "loss/generator_gan")
            keys += ("loss/generator_regression",) if mode == "data_free" else ()
        for k in keys:
            assert va[k] == pytest.approx(vb[k], rel=1e-4, abs=1e-6), k
    assert sum("loss/generator" in v for _, v in a["history"]) == 2
    for sizes in b["sizes"]:  # ZeRO-3 shards over the dp x sp ranks, here the 2 sp ranks
        for role in ("generator", "fake_score"):
            assert 0.45 <= sizes[role]["optimizer_fp32_local"] / sizes[role]["total"] <= 0.55
    for role in ("generator", "fake_score"):
        worst = max(float((a["states"][role][k] - b["states"][role][k]).abs().max()) for k in a["states"][role])
        assert worst < 2e-5, (role, worst)
