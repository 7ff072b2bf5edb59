"""The run's steps as diffusers' stock FlowMatchEulerDiscreteScheduler: the fit against hand-derived
values, every step list our presets make, the lists it cannot hold, its step as the DMD step with
the global RNG's noise, the export's choice of scheduler, and use_dmd_scheduler."""
import json
import logging
from types import SimpleNamespace

import pytest
import torch

from megadmd.config import ConfigError
from megadmd.flow import warp_steps
from megadmd.pipeline import DMDScheduler, use_dmd_scheduler
from megadmd.pipeline.info import SAMPLING_FILE, sampling_info
from megadmd.pipeline.stock import TOLERANCE, diffusers_noise, fit_stock_scheduler, stock_timesteps

PRESET_SHIFTS = (3.0, 5.0, 8.0, 12.0)  # tiny and wan2.1-14b, wan2.2-ti2v-5b, wan2.1-1.3b, wan2.2-a14b


def test_linear_lists_need_shift_one_and_the_last_step_as_terminal():
    for steps, terminal in (([1000, 750, 500, 250], 0.25), ([1000, 500], 0.5)):
        config, why = fit_stock_scheduler(steps)
        assert why == "" and config["shift"] == 1.0 and config["shift_terminal"] == terminal
        assert config["stochastic_sampling"] is True
    assert fit_stock_scheduler([1000])[0]["shift_terminal"] is None  # one step: nothing to stretch
    assert stock_timesteps(fit_stock_scheduler([1000])[0], 1) == [1000.0]


def test_three_steps_solve_the_shift_from_the_middle_step():
    config, _ = fit_stock_scheduler([1000, 757, 522])
    s = config["shift"]
    # by hand: u = linspace(1, m, 3) with m = shift(0.001), then shifted, then stretched to end at
    # 0.522; the stretch keeps (1 - sigma_1) / (1 - sigma_2), and 1 - shift(u) = (1 - u) / (1 + (s - 1) u),
    # with 1 - u_1 = (1 - m) / 2 and 1 - u_2 = 1 - m:  ratio = (1 + (s - 1) m) / (2 (1 + (s - 1) u_1))
    m = s * 1e-3 / (1 + (s - 1) * 1e-3)
    u1 = (1 + m) / 2
    assert (1 + (s - 1) * m) / (2 * (1 + (s - 1) * u1)) == pytest.approx(0.243 / 0.478, rel=1e-6)
    assert config["shift_terminal"] == 0.522 and 0.9 < s < 1  # a middle step above the midpoint: shift < 1
    assert stock_timesteps(config, 3) == pytest.approx([1000, 757, 522], abs=1e-4)


@pytest.mark.parametrize("nominal", [[1000, 757, 522], [1000, 750, 500, 250]])
def test_every_preset_list_plain_or_warped_is_held(nominal):
    for steps in [nominal] + [warp_steps(nominal, shift) for shift in PRESET_SHIFTS]:
        config, why = fit_stock_scheduler(steps)
        assert config is not None, (steps, why)
        got = stock_timesteps(config, len(steps))
        assert max(abs(a - b) for a, b in zip(got, steps)) < 2e-4, (steps, got)  # float32 rounding only


def test_lists_it_cannot_hold_say_why():
    cases = {(900, 500): "first step is 900", (1000, 900, 500, 100): "no shift and shift_terminal",
             (1000, 999.99, 500): "no shift and shift_terminal",  # the middle step too close to 1000
             (1000, 1000): "repeats"}
    for steps, why in cases.items():
        config, reason = fit_stock_scheduler(list(steps))
        assert config is None and why in reason, (steps, reason)
    assert f"tolerance {TOLERANCE:g}" in fit_stock_scheduler([1000, 900, 500, 100])[1]


def test_stock_step_is_the_dmd_step_with_the_global_rngs_noise():
    from megadmd.pipeline.stock import stock_scheduler

    s = stock_scheduler(fit_stock_scheduler([1000, 500])[0])
    s.set_timesteps(2)
    s.set_begin_index(0)  # as WanPipeline does
    x, v = torch.full((1, 2), 2.0), torch.full((1, 2), 1.5)
    torch.manual_seed(4)
    out = s.step(v, s.timesteps[0], x).prev_sample
    eps = torch.randn((1, 2), generator=torch.Generator().manual_seed(4))  # what the global RNG drew
    torch.testing.assert_close(out, 0.25 + 0.5 * eps)  # x0 = 2 - 1.5 = 0.5, re-noised to sigma 0.5
    last = s.step(torch.full((1, 2), 2.0), s.timesteps[1], torch.full((1, 2), 3.0)).prev_sample
    assert torch.equal(last, torch.full((1, 2), 2.0))  # sigma 0.5 -> 0: x0 = 3 - 0.5 * 2, no noise


def test_diffusers_noise_draws_what_manual_seed_then_the_pipeline_draws():
    shape = (2, 1, 3, 3)
    start, renoise = diffusers_noise(7, [0, 1], shape, "cpu")
    for j in (0, 1):
        torch.manual_seed(7 + j)
        assert torch.equal(start[j:j + 1], torch.randn((1, *shape)))  # prepare_latents, no generator
        first = torch.randn((1, *shape))  # scheduler.step
    assert torch.equal(renoise(0)[1:], first)
    alone, _ = diffusers_noise(8, [0], shape, "cpu")
    assert torch.equal(alone, start[1:])  # a sample does not depend on its batch-mates


def _fake_base(root):
    """A pipeline folder with only what add_pipeline_components reads."""
    (root / "vae").mkdir(parents=True)
    (root / "vae" / "config.json").write_text("{}")
    (root / "scheduler").mkdir()
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}))
    return root


@pytest.mark.parametrize("steps,kind", [([1000, 757, 522], "stock"), ([1000, 900, 500, 100], "dmd")])
def test_export_writes_the_stock_scheduler_where_it_can_else_ours(tmp_path, caplog, steps, kind):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from megadmd.pipeline.folder import add_pipeline_components

    base, tmp = _fake_base(tmp_path / "base"), tmp_path / "tmp"
    tmp.mkdir()
    info = sampling_info({"dmd": {"denoising_steps": steps}}, step=0, weights="ema")
    with caplog.at_level(logging.WARNING, logger="megadmd"):
        add_pipeline_components(base, tmp, tmp_path / "out", ["transformer"], sampling=info)
    index = json.loads((tmp / "model_index.json").read_text())
    written = json.loads((tmp / SAMPLING_FILE).read_text())
    assert written["num_inference_steps"] == len(steps) and (tmp / "vae" / "config.json").is_file()
    if kind == "stock":
        assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        assert written["scheduler"] == {"library": "diffusers", "class_name": "FlowMatchEulerDiscreteScheduler"}
        s = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tmp / "scheduler"))
        s.set_timesteps(written["num_inference_steps"])
        assert s.timesteps.tolist() == pytest.approx(steps, abs=TOLERANCE) and s.config.stochastic_sampling
        assert not caplog.text
    else:
        assert index["scheduler"] == ["megadmd.pipeline.scheduler", "DMDScheduler"]
        record = written["scheduler"]
        assert record["class_name"] == "DMDScheduler" and "no shift" in record["why_not_stock"]
        assert DMDScheduler.from_pretrained(str(tmp / "scheduler")).config.timesteps == steps
        assert len(caplog.records) == 1 and "needs `import megadmd.pipeline`" in caplog.text


def test_use_dmd_scheduler_takes_the_steps_from_the_export(tmp_path):
    pipe = SimpleNamespace(name_or_path=str(tmp_path), scheduler=None)
    with pytest.raises(ConfigError, match="pass the export folder"):
        use_dmd_scheduler(pipe)
    info = sampling_info({"dmd": {"denoising_steps": [1000, 600]}}, step=0, weights="ema")
    (tmp_path / SAMPLING_FILE).write_text(json.dumps(info))
    assert use_dmd_scheduler(pipe) is pipe.scheduler and pipe.scheduler.config.timesteps == [1000.0, 600.0]
    other = SimpleNamespace(name_or_path="user/fastwan", scheduler=None)  # a hub name: no local file
    assert use_dmd_scheduler(other, model=tmp_path).config.timesteps == [1000.0, 600.0]
