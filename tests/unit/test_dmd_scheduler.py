"""The shipped sampler: DMDScheduler's step against hand-derived values, its seeded re-noise,
its config round trip; megadmd_sampling.json from a run config; generate's and enable_vsa's
defaults and refusals."""
import json
import logging

import pytest
import torch

from megadmd.config import ConfigError
from megadmd.pipeline import DMDScheduler
from megadmd.pipeline.info import SAMPLING_FILE, read_sampling_info, sampling_info
from megadmd.pipeline.scheduler import draw_renoise, renoise_generators, start_noise


def test_step_is_x0_from_velocity_then_fresh_noise_to_the_next_sigma():
    s = DMDScheduler(timesteps=[1000, 500])
    s.set_timesteps()
    x = torch.full((1, 2), 2.0)
    v = torch.full((1, 2), 1.5)
    g = torch.Generator().manual_seed(4)
    eps = torch.randn((1, 2), generator=torch.Generator().manual_seed(4))
    out = s.step(v, s.timesteps[0], x, generator=g)
    # sigma 1: x0 = 2 - 1 * 1.5 = 0.5; then (1 - 0.5) * 0.5 + 0.5 * eps
    torch.testing.assert_close(out.pred_original_sample, torch.full((1, 2), 0.5))
    torch.testing.assert_close(out.prev_sample, 0.25 + 0.5 * eps)
    # the last step (sigma 0.5, next 0) returns x0 = 3 - 0.5 * 2 = 2, with no noise
    last = s.step(torch.full((1, 2), 2.0), s.timesteps[1], torch.full((1, 2), 3.0), return_dict=False)[0]
    torch.testing.assert_close(last, torch.full((1, 2), 2.0))
    with pytest.raises(IndexError, match="set_timesteps"):
        s.step(v, s.timesteps[1], x)


def test_pinned_timesteps_ignore_the_pipelines_step_count_and_round_trip(tmp_path, caplog):
    s = DMDScheduler(timesteps=[1000, 961.4, 897.3])
    with caplog.at_level(logging.WARNING, logger="megadmd"):
        s.set_timesteps(50)
    assert "num_inference_steps=50 is ignored" in caplog.text
    assert s.timesteps.tolist() == pytest.approx([1000, 961.4, 897.3])
    assert s.sigmas.tolist() == pytest.approx([1.0, 0.9614, 0.8973, 0.0])
    s.save_pretrained(str(tmp_path))
    again = DMDScheduler.from_pretrained(str(tmp_path))
    again.set_timesteps(3)
    assert torch.equal(again.timesteps, s.timesteps) and again.config.timesteps == [1000.0, 961.4, 897.3]
    for bad in ([500, 1000], [1000, 0], []):
        with pytest.raises(ConfigError, match="must decrease"):
            DMDScheduler(timesteps=bad)


def test_renoise_is_fixed_by_each_samples_start_and_does_not_depend_on_its_batch_mates():
    a, b = start_noise(1, (4, 2, 3)), start_noise(2, (4, 2, 3))
    assert torch.equal(a, torch.randn((1, 4, 2, 3), generator=torch.Generator().manual_seed(1)))  # diffusers' draw
    pair = torch.cat([a, b])
    gens_pair, gens_a = renoise_generators(pair), renoise_generators(a)
    first_pair, first_a = draw_renoise(gens_pair, pair.shape, "cpu"), draw_renoise(gens_a, a.shape, "cpu")
    assert torch.equal(first_pair[:1], first_a)
    assert not torch.equal(first_pair[0], first_pair[1])
    assert not torch.equal(draw_renoise(gens_a, a.shape, "cpu"), first_a)  # each step draws anew
    assert torch.equal(draw_renoise(renoise_generators(a), a.shape, "cpu"), first_a)  # same start, same noise


def test_scheduler_without_a_generator_uses_the_start_seeded_renoise():
    s = DMDScheduler(timesteps=[1000, 757, 522])
    s.set_timesteps(3)
    x = start_noise(9, (2, 2, 2))
    v = torch.zeros_like(x)
    gens = renoise_generators(x)
    out = s.step(v, s.timesteps[0], x).prev_sample
    want = (1 - 0.757) * x + 0.757 * draw_renoise(gens, x.shape, "cpu")  # x0 = x at sigma 1 with v = 0
    torch.testing.assert_close(out, want)


def test_sampling_info_warps_like_the_trainer_and_reads_the_ramped_sparsity():
    run = {"dmd": {"denoising_steps": [1000, 757, 522], "warp_denoising_step": True, "flow_shift": 8.0,
                   "guidance_scale": 3.5, "cfg_form": "offset"},
           "attention": {"vsa_sparsity": 0.5, "vsa_decay_rate": 0.1, "vsa_decay_interval_steps": 10}}
    info = sampling_info(run, step=25, weights="ema")
    # 1000 * 8s / (1 + 7s): s = 0.757 -> 6.056 / 6.299 = 961.4224..., s = 0.522 -> 4.176 / 4.654 = 897.2926...
    assert info["timesteps"] == pytest.approx([1000.0, 961.4224, 897.2926], abs=1e-3)
    assert info["attention"] == {"kind": "vsa", "vsa_sparsity": pytest.approx(0.2)}  # 25 // 10 * 0.1
    assert info["guidance_scale"] == 1.0 and info["training"]["guidance_scale"] == 3.5
    plain = sampling_info({"dmd": {"denoising_steps": [1000, 500]}}, step=3, weights="generator")
    assert plain["timesteps"] == [1000.0, 500.0] and plain["attention"]["kind"] == "dense"


def test_sampling_file_is_found_from_the_transformer_subfolder_and_checked(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    assert read_sampling_info(tmp_path / "transformer") is None
    info = sampling_info({}, step=0, weights="ema")
    (tmp_path / SAMPLING_FILE).write_text(json.dumps(info))
    assert read_sampling_info(tmp_path / "transformer")["timesteps"] == [1000.0, 757.0, 522.0]
    (tmp_path / SAMPLING_FILE).write_text(json.dumps({**info, "timesteps": [1, 2]}))
    with pytest.raises(ConfigError, match="not a valid megadmd sampling file"):
        read_sampling_info(tmp_path)


def test_generate_defaults_come_from_the_model_and_conflicts_are_refused(tmp_path):
    from megadmd.generate import GenerateOptions, with_model_defaults

    def opts(**kw):
        return GenerateOptions(model=str(tmp_path), out="x", latent_shape=(4, 2, 4, 4), **kw)

    assert with_model_defaults(opts()).steps == [1000.0, 757.0, 522.0]
    assert with_model_defaults(opts()).attention == "dense"
    info = sampling_info({"dmd": {"denoising_steps": [1000, 600]}, "attention": {"vsa_sparsity": 0.8}}, 9, "ema")
    (tmp_path / SAMPLING_FILE).write_text(json.dumps(info))
    o = with_model_defaults(opts())
    assert (o.steps, o.attention, o.vsa_sparsity) == ([1000.0, 600.0], "vsa", 0.8)
    assert with_model_defaults(opts(attention="dense")).vsa_sparsity is None
    assert with_model_defaults(opts(vsa_sparsity=0.5, steps=[900])).vsa_sparsity == 0.5
    with pytest.raises(ConfigError, match="--vsa-sparsity needs --attention vsa"):
        with_model_defaults(opts(attention="dense", vsa_sparsity=0.5))
    (tmp_path / SAMPLING_FILE).unlink()
    with pytest.raises(ConfigError, match="--attention vsa needs --vsa-sparsity"):
        with_model_defaults(opts(attention="vsa"))


def test_enable_vsa_needs_a_sparsity_it_can_use(tmp_path):
    from megadmd.attention import enable_vsa
    from megadmd.models import build_wan
    from tests.helpers import TEST_WAN_CONFIG

    model = build_wan(TEST_WAN_CONFIG)
    with pytest.raises(ConfigError, match="give sparsity"):
        enable_vsa(model)
    with pytest.raises(ConfigError, match=r"in \(0, 1\)"):
        enable_vsa(model, sparsity=1.5)
    assert enable_vsa(model, sparsity=0.5) == 0  # no folder: zero gates, the coarse branch off
    assert len(model.megadmd_sequence_context.handles) == 1
    enable_vsa(model, sparsity=0.7)  # again: the old hooks go, the new sparsity holds
    assert len(model.megadmd_sequence_context.handles) == 1
    assert model.blocks[0].attn1.processor.vsa.sparsity == 0.7
