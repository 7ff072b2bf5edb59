"""DeepSpeed config filling and the LR schedules (no engines built here)."""
import json

import pytest

from megadmd.config import ConfigError, OptimConfig, TrainConfig
from megadmd.roles import fill_ds_config, load_ds_template, lr_lambda, optimizer_steps_total


def test_templates_ship_and_are_zero3():
    for name in ("zero3", "zero3_inference", "zero3_offload", "zero3_inference_offload"):
        assert load_ds_template(name, "deepspeed.x")["zero_optimization"]["stage"] == 3
    assert load_ds_template("zero3_offload", "x")["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert load_ds_template("zero3_inference_offload", "x")["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_a_template_that_sets_owned_keys_is_an_error(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4,
                             "bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu, bf16"):
        load_ds_template(str(p), "deepspeed.generator")


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


def test_lr_schedules_by_hand():
    const = lr_lambda(OptimConfig(scheduler="constant", warmup_steps=4), 100)
    assert [const(n) for n in (0, 1, 3, 4, 50)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cos = lr_lambda(OptimConfig(scheduler="cosine", warmup_steps=0, min_lr_ratio=0.5), 10)
    assert cos(0) == pytest.approx(1.0) and cos(5) == pytest.approx(0.75) and cos(10) == pytest.approx(0.5)
    lin = lr_lambda(OptimConfig(scheduler="linear", warmup_steps=2, min_lr_ratio=0.0), 12)
    assert lin(2) == pytest.approx(1.0) and lin(7) == pytest.approx(0.5) and lin(12) == pytest.approx(0.0)


def test_generator_schedule_counts_generator_updates_only():
    assert optimizer_steps_total("generator", 4000, 5) == 800
    assert optimizer_steps_total("fake_score", 4000, 5) == 4000
