"""DeepSpeed config filling and the LR schedules (no engines built here)."""
import json
import math

import pytest
import torch

from megadmd.config import ConfigError, OptimConfig, TrainConfig
from megadmd.roles import check_schedule, fill_ds_config, load_ds_template, lr_scheduler, schedule_fn


def test_templates_ship_and_are_zero3():
    for name in ("zero3", "zero3_inference", "zero3_offload", "zero3_inference_offload"):
        assert load_ds_template(name, "deepspeed.x")["zero_optimization"]["stage"] == 3
    assert load_ds_template("zero3_offload", "x")["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert load_ds_template("zero3_inference_offload", "x")["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_a_template_that_sets_owned_keys_must_agree(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4,
                             "bf16": {"enabled": True}}))
    tpl = load_ds_template(str(p), "deepspeed.generator")
    c = fill_ds_config(tpl, TrainConfig(micro_batch_size=4), dp_size=2, bf16=True, trainable=True)
    assert c["train_micro_batch_size_per_gpu"] == 4 and c["train_batch_size"] == 8
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=4 but megadmd's train.micro_batch_size gives 1"):
        fill_ds_config(tpl, TrainConfig(micro_batch_size=1), dp_size=2, bf16=True, trainable=True,
                       key="deepspeed.generator", source=str(p))


def test_a_template_without_zero3_is_an_error(tmp_path):
    p = tmp_path / "z2.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="stage 3"):
        load_ds_template(str(p), "deepspeed.generator")


def test_fill_owns_batch_precision_clipping():
    t = TrainConfig(micro_batch_size=2, grad_accum_steps=3, max_grad_norm=0.5)
    c = fill_ds_config({"zero_optimization": {"stage": 3}}, t, dp_size=4, bf16=True, trainable=True)
    assert c["train_batch_size"] == 24 and c["train_micro_batch_size_per_gpu"] == 2
    assert c["gradient_accumulation_steps"] == 3 and c["gradient_clipping"] == 0.5
    assert c["bf16"] == {"enabled": True}
    frozen = fill_ds_config({"zero_optimization": {"stage": 3}}, t, 4, bf16=False, trainable=False)
    assert "gradient_clipping" not in frozen


def _lrs(sched, n: int) -> list:
    """The learning rate of each of the first ``n`` optimizer updates (scheduler stepped after each)."""
    out = []
    for _ in range(n):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return out


def _ours(o: OptimConfig, max_steps: int, interval: int):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=o.lr)
    return lr_scheduler(opt, o, max_steps, interval)


def _diffusers(name: str, lr: float, **kw):
    from diffusers.optimization import get_scheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    return get_scheduler(name, opt, **kw)


@pytest.mark.parametrize("name,extra", [
    ("constant", {}), ("constant_with_warmup", {}), ("linear", {}), ("cosine", {}),
    ("cosine_with_restarts", {"num_cycles": 3}), ("polynomial", {"power": 2.0}),
    ("piecewise_constant", {"step_rules": "1:40,0.5:120,0.1"}),
])
def test_schedules_are_diffusers_own_at_chosen_iterations(name, extra):
    """Every diffusers schedule, for the fake score (an update every iteration) and the generator
    (an update every 5th iteration): the LR of the update in iteration s is diffusers' LR after
    s - 1 scheduler steps, i.e. both count iterations."""
    warm = 0 if name in ("constant", "piecewise_constant") else 20
    o = OptimConfig(lr=1e-3, scheduler=name, warmup_steps=warm, **extra)
    kw = {"step_rules": extra.get("step_rules"), "num_warmup_steps": warm, "num_training_steps": 200,
          "num_cycles": int(extra.get("num_cycles", 1)), "power": extra.get("power", 1.0)}
    ref = _lrs(_diffusers(name, 1e-3, **kw), 200)  # ref[i]: the LR of iteration i + 1
    fake = _lrs(_ours(o, 200, 1), 200)
    gen = _lrs(_ours(o, 200, 5), 40)
    for s in (1, 2, 19, 20, 21, 40, 41, 100, 120, 121, 199, 200):
        assert fake[s - 1] == pytest.approx(ref[s - 1], rel=1e-12, abs=1e-15), (name, s)
    for k in (1, 2, 4, 5, 20, 24, 25, 40):  # the generator's k-th update runs in iteration 5k
        assert gen[k - 1] == pytest.approx(ref[5 * k - 1], rel=1e-12, abs=1e-15), (name, k)
    if name == "linear":  # a hand value too: half-way through the decay
        assert fake[110] == pytest.approx(1e-3 * 0.5)


def test_cosine_with_min_lr_is_fastvideos_max_of_floor_and_cosine():
    """FastVideo's Wan2.2-5B recipe: warm-up over 100 iterations, then max(0.5, half cosine) over 4,000."""
    f = schedule_fn(OptimConfig(scheduler="cosine_with_min_lr", warmup_steps=100, min_lr_ratio=0.5), 4000)
    assert f(0) == 0.0 and f(50) == pytest.approx(0.5) and f(99) == pytest.approx(0.99)
    assert f(100) == pytest.approx(1.0)
    assert f(100 + 1300) == pytest.approx(0.75)  # a third of the decay: (1 + cos(pi / 3)) / 2
    assert f(100 + 1950) == pytest.approx(0.5)  # half-way the cosine is 0.5 ...
    assert f(100 + 2925) == pytest.approx(0.5)  # ... and below it the floor holds: cos gives 0.146
    # megadmd's own "cosine" with a floor keeps its shape: floor + (1 - floor) cos
    g = schedule_fn(OptimConfig(scheduler="cosine", warmup_steps=100, min_lr_ratio=0.5), 4000)
    assert g(100 + 1950) == pytest.approx(0.75) and g(100 + 2925) == pytest.approx(0.5 + 0.5 * 0.1464466, rel=1e-5)
    assert g(4000) == pytest.approx(0.5)


def test_warmup_counts_iterations_for_both_roles():
    """warmup_steps=100 is 100 iterations: the generator (updated every 5th) is warm at its 21st
    update, iteration 105, not at its 101st (iteration 505) as when updates were counted."""
    o = OptimConfig(lr=1.0, scheduler="cosine_with_min_lr", warmup_steps=100, min_lr_ratio=0.5)
    gen = _lrs(_ours(o, 4000, 5), 25)
    assert gen[0] == pytest.approx(0.04)  # iteration 5: f(4) = 4 / 100
    assert gen[19] == pytest.approx(0.99)  # iteration 100: f(99)
    assert gen[20] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 3900)))  # iteration 105: decaying
    fake = _lrs(_ours(o, 4000, 1), 101)
    assert fake[99] == pytest.approx(0.99) and fake[100] == pytest.approx(1.0)


def test_old_config_values_keep_their_meaning():
    const = schedule_fn(OptimConfig(scheduler="constant", warmup_steps=4), 100)  # = constant_with_warmup
    assert [const(i) for i in (0, 1, 3, 4, 50)] == [0.0, 0.25, 0.75, 1.0, 1.0]
    cos = schedule_fn(OptimConfig(scheduler="cosine", min_lr_ratio=0.5), 10)
    assert cos(0) == pytest.approx(1.0) and cos(5) == pytest.approx(0.75) and cos(10) == pytest.approx(0.5)
    lin = schedule_fn(OptimConfig(scheduler="linear", warmup_steps=2, min_lr_ratio=0.2), 12)
    assert lin(2) == pytest.approx(1.0) and lin(7) == pytest.approx(0.6) and lin(12) == pytest.approx(0.2)


def test_a_resumed_schedule_continues_where_it_stopped():
    o = OptimConfig(lr=1.0, scheduler="cosine", warmup_steps=10)
    a = _ours(o, 100, 5)
    _lrs(a, 7)
    b = _ours(o, 100, 5)
    b.load_state_dict(a.state_dict())
    b.optimizer.param_groups[0]["lr"] = a.optimizer.param_groups[0]["lr"]  # DeepSpeed restores it with the optimizer
    assert _lrs(b, 5) == _lrs(a, 5)


def test_schedule_settings_are_checked():
    with pytest.raises(ConfigError, match="must be one of .*cosine_with_min_lr"):
        check_schedule(OptimConfig(scheduler="warmup_cosine"), "optim.generator")
    with pytest.raises(ConfigError, match="min_lr_ratio=0.5 has no effect with scheduler 'constant'"):
        check_schedule(OptimConfig(scheduler="constant", min_lr_ratio=0.5), "optim.generator")
    with pytest.raises(ConfigError, match="step_rules is required"):
        check_schedule(OptimConfig(scheduler="piecewise_constant"), "optim.fake_score")
    check_schedule(OptimConfig(scheduler="cosine_with_min_lr", warmup_steps=100, min_lr_ratio=0.5), "x")


def test_wan22_5b_preset_is_fastvideos_script_recipe():
    """examples/distill/Wan2.2-TI2V-5B-Diffusers/Data-free/distill_dmd_t2v_5B.sh: 4,000 iterations,
    cosine_with_min_lr with min_lr_ratio 0.5 and a 100-iteration warm-up for both learning rates."""
    from megadmd.config import resolve

    cfg = resolve(None, ["preset=wan2.2-ti2v-5b"])
    assert cfg.train.max_steps == 4000
    for o, lr in ((cfg.optim.generator, 4e-6), (cfg.optim.fake_score, 2e-6)):
        assert (o.scheduler, o.warmup_steps, o.min_lr_ratio, o.lr) == ("cosine_with_min_lr", 100, 0.5, lr)
