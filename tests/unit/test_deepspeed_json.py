"""A user's full DeepSpeed JSON: megadmd's owned keys checked and filled, the rest passed through."""
import copy
import json

import pytest

from megadmd.config import ConfigError, DeepSpeedConfig, OptimConfig, OptimTree, TrainConfig
from megadmd.roles import role_ds_config

# Assembled from DeepSpeed's own documentation examples (deepspeedai/DeepSpeed, docs/): the ZeRO-3
# offload config of docs/_tutorials/zero.md; the "optimizer", "scheduler", "bf16", "flops_profiler",
# "activation_checkpointing", "tensorboard", "csv_monitor" and "comms_logger" examples of
# docs/_pages/config-json.md; and the batch and clipping keys config-json.md documents. The
# scheduler's params are "auto" (Hugging Face's convention); the doc's own numbers are refused below.
DOCS_JSON = {
    "train_batch_size": 8,
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "steps_per_print": 10,
    "wall_clock_breakdown": False,
    "optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8,
                                             "weight_decay": 3e-7}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "bf16": {"enabled": True},
    "zero_optimization": {
        "stage": 3,
        "contiguous_gradients": True,
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_prefetch_bucket_size": 1e7,
        "stage3_param_persistence_threshold": 1e5,
        "reduce_bucket_size": 1e7,
        "sub_group_size": 1e9,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    },
    "flops_profiler": {"enabled": False, "profile_step": 1, "module_depth": -1, "top_modules": 1,
                       "detailed": True, "output_file": None},
    "activation_checkpointing": {"partition_activations": False, "cpu_checkpointing": False,
                                 "contiguous_memory_optimization": False, "number_checkpoints": None,
                                 "synchronize_checkpoint_boundary": False, "profile": False},
    "tensorboard": {"enabled": True, "output_path": "output/ds_logs/", "job_name": "train_bert"},
    "csv_monitor": {"enabled": True, "output_path": "output/ds_logs/", "job_name": "train_bert"},
    "comms_logger": {"enabled": True, "verbose": False, "prof_all": True, "debug": False},
}
# megadmd settings that agree with the JSON above (2 dp ranks x micro-batch 4 = 8)
TRAIN = TrainConfig(micro_batch_size=4, grad_accum_steps=1, max_grad_norm=1.0)
OPTIM = OptimTree(generator=OptimConfig(lr=0.001, betas=[0.8, 0.999], eps=1e-8, weight_decay=3e-7),
                  fake_score=OptimConfig(lr=0.001, betas=[0.8, 0.999], eps=1e-8, weight_decay=3e-7))


def _write(tmp_path, cfg: dict):
    p = tmp_path / "ds_config.json"
    p.write_text(json.dumps(cfg))
    return DeepSpeedConfig(generator=str(p), fake_score=str(p), teacher=str(p))


def _fill(tmp_path, cfg: dict, role="generator", train=TRAIN, optim=OPTIM, dp=2, bf16=True):
    return role_ds_config(role, _write(tmp_path, cfg), train, optim, dp, bf16)


def test_a_full_docs_json_is_accepted_and_passed_through(tmp_path):
    out = _fill(tmp_path, DOCS_JSON)
    # owned keys: megadmd's values; the optimizer and scheduler sections: megadmd builds its own
    assert out["train_batch_size"] == 8 and out["train_micro_batch_size_per_gpu"] == 4
    assert out["gradient_accumulation_steps"] == 1 and out["gradient_clipping"] == 1.0
    assert out["bf16"] == {"enabled": True}
    assert "optimizer" not in out and "scheduler" not in out
    # everything else reaches DeepSpeed as written
    for k in ("zero_optimization", "flops_profiler", "activation_checkpointing", "tensorboard", "csv_monitor",
              "comms_logger", "steps_per_print", "wall_clock_breakdown"):
        assert out[k] == DOCS_JSON[k], k
    teacher = _fill(tmp_path, DOCS_JSON, role="teacher")  # no optimizer, no clipping
    assert "gradient_clipping" not in teacher and "optimizer" not in teacher
    assert teacher["zero_optimization"] == DOCS_JSON["zero_optimization"]


def test_auto_values_agree_and_are_filled(tmp_path):
    cfg = copy.deepcopy(DOCS_JSON)
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping"):
        cfg[k] = "auto"
    cfg["bf16"] = {"enabled": "auto"}
    cfg["optimizer"]["params"] = {k: "auto" for k in cfg["optimizer"]["params"]}
    cfg["zero_optimization"]["reduce_bucket_size"] = "auto"  # HF fills it from the model; DeepSpeed would refuse
    out = _fill(tmp_path, cfg, train=TrainConfig(micro_batch_size=2, grad_accum_steps=3, max_grad_norm=0.5),
                optim=OptimTree(), dp=4, bf16=False)
    assert (out["train_batch_size"], out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) == (24, 2, 3)
    assert out["gradient_clipping"] == 0.5 and out["bf16"] == {"enabled": False}
    assert "reduce_bucket_size" not in out["zero_optimization"] and out["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("change,message", [
    ({"train_micro_batch_size_per_gpu": 8},
     "sets train_micro_batch_size_per_gpu=8 but megadmd's train.micro_batch_size gives 4"),
    ({"train_batch_size": 16}, "sets train_batch_size=16 but megadmd's train.micro_batch_size x "
                               "train.grad_accum_steps x dp (2) gives 8"),
    ({"gradient_clipping": 0.5}, "sets gradient_clipping=0.5 but megadmd's train.max_grad_norm gives 1.0"),
    ({"bf16": {"enabled": False}}, "sets bf16.enabled=false but megadmd's model.precision gives true"),
    ({"fp16": {"enabled": True}}, "sets fp16.enabled=true but megadmd's model.precision gives false"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 0.002}}},
     "sets optimizer.params.lr=0.002 but megadmd's optim.generator.lr gives 0.001"),
    ({"optimizer": {"type": "OneBitAdam", "params": {"lr": 0.001}}}, "optimizer.type=OneBitAdam"),
    # the doc's own WarmupLR numbers: a log warm-up over 1000 optimizer steps is not megadmd's schedule
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001,
                                                   "warmup_num_steps": 1000}}},
     "sets scheduler WarmupLR with warmup_min_lr=0 but megadmd's schedule is optim.generator.scheduler='constant'"),
])
def test_a_conflicting_json_is_refused_with_one_line(tmp_path, change, message):
    cfg = {**copy.deepcopy(DOCS_JSON), **change}
    with pytest.raises(ConfigError) as err:
        _fill(tmp_path, cfg)
    text = str(err.value)
    assert message in text and "\n" not in text
    assert text.startswith(f"deepspeed.generator: DeepSpeed config {tmp_path / 'ds_config.json'} sets")


def test_the_teacher_ignores_optimizer_sections_but_not_batch_sizes(tmp_path):
    cfg = {**copy.deepcopy(DOCS_JSON), "optimizer": {"type": "Adam", "params": {"lr": 0.5}}}
    assert "optimizer" not in _fill(tmp_path, cfg, role="teacher")
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=4 but"):
        _fill(tmp_path, DOCS_JSON, role="teacher", train=TrainConfig(micro_batch_size=1))
