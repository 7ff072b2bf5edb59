"""megadmd convert from-fastvideo-config on FastVideo's published DMD2 examples: the legacy
trainer's launch script (offset CFG) and the modular trainer's YAML (standard CFG)."""
import re

import pytest
from click.testing import CliRunner

from megadmd.cli import main
from megadmd.config import ConfigError, resolve
from megadmd.interop.fastvideo_config import convert_fastvideo_config, parse_flags, script_args

# hao-ai-lab/FastVideo examples/distill/Wan2.1-T2V/Wan-Syn-Data-480P/distill_dmd_t2v_1.3B.slurm,
# from its "# Configs" line to the end (the SBATCH header and environment set-up left out)
LEGACY_1_3B = r"""# Configs
NUM_GPUS=8
MODEL_PATH="Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
REAL_SCORE_MODEL_PATH="Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
FAKE_SCORE_MODEL_PATH="Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
DATA_DIR=your_data_dir
VALIDATION_DATASET_FILE=your_validation_dataset_file
OUTPUT_DIR="checkpoints/wan_t2v_finetune"
# export CUDA_VISIBLE_DEVICES=4,5
# IP=[MASTER NODE IP]

# Training arguments
training_args=(
  --tracker_project_name wan_t2v_distill_dmd
  --output_dir "$OUTPUT_DIR"
  --max_train_steps 4000
  --train_batch_size 1
  --train_sp_batch_size 1
  --gradient_accumulation_steps 1
  --num_latent_t 21
  --num_height 480
  --num_width 832
  --num_frames 81
  --enable_gradient_checkpointing_type "full"
)

# Parallel arguments
parallel_args=(
  --num_gpus 64
  --sp_size 1
  --tp_size 1
  --hsdp_replicate_dim 64
  --hsdp_shard_dim 1
)

# Model arguments
model_args=(
  --model_path $MODEL_PATH
  --pretrained_model_name_or_path $MODEL_PATH
  --real_score_model_path $REAL_SCORE_MODEL_PATH
  --fake_score_model_path $FAKE_SCORE_MODEL_PATH
)

# Dataset arguments
dataset_args=(
  --data_path "$DATA_DIR"
  --dataloader_num_workers 4
)

# Validation arguments
validation_args=(
  --log_validation
  --validation_dataset_file "$VALIDATION_DATASET_FILE"
  --validation_steps 200
  --validation_sampling_steps "3"
  --validation_guidance_scale "6.0" # not used for dmd inference
)

# Optimizer arguments
optimizer_args=(
  --learning_rate 2e-6
  --mixed_precision "bf16"
  --training_state_checkpointing_steps 500
  --weight_only_checkpointing_steps 500
  --weight_decay 0.01
  --max_grad_norm 1.0
)

# Miscellaneous arguments
miscellaneous_args=(
  --inference_mode False
  --checkpoints_total_limit 3
  --training_cfg_rate 0.0
  --dit_precision "fp32"
  --ema_start_step 0
  --flow_shift 8
  --seed 1000
)

# DMD arguments
dmd_args=(
  --dmd_denoising_steps '1000,757,522'
  --min_timestep_ratio 0.02
  --max_timestep_ratio 0.98
  --generator_update_interval 5
  --real_score_guidance_scale 3.5
)

srun torchrun \
--nnodes $SLURM_JOB_NUM_NODES \
--nproc_per_node $NUM_GPUS \
--node_rank $SLURM_PROCID \
--rdzv_backend=c10d \
--rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    fastvideo/training/wan_distillation_pipeline.py \
    "${parallel_args[@]}" \
    "${model_args[@]}" \
    "${dataset_args[@]}" \
    "${training_args[@]}" \
    "${optimizer_args[@]}" \
    "${validation_args[@]}" \
    "${miscellaneous_args[@]}" \
    "${dmd_args[@]}"
"""

# the optimizer and DMD arrays of examples/distill/Wan2.2-TI2V-5B-Diffusers/Data-free/distill_dmd_t2v_5B.sh,
# whose other arrays equal the script above but for the model and shape
LEGACY_5B_FLAGS = r"""
MODEL_PATH="Wan-AI/Wan2.2-TI2V-5B-Diffusers"
training_args=(
  --max_train_steps 4000
  --train_batch_size 1
  --num_latent_t 31
  --num_height 704
  --num_width 1280
  --num_frames 121
)
model_args=(
  --model_path $MODEL_PATH
  --real_score_model_path $MODEL_PATH
  --fake_score_model_path $MODEL_PATH
)
optimizer_args=(
  --learning_rate 4e-6
  --lr_scheduler "cosine_with_min_lr"
  --min_lr_ratio 0.5
  --lr_warmup_steps 100
  --fake_score_learning_rate 2e-6
  --fake_score_lr_scheduler "cosine_with_min_lr"
  --mixed_precision "bf16"
  --training_state_checkpointing_steps 500
  --weight_only_checkpointing_steps 200
  --weight_decay 0.01
  --max_grad_norm 1.0
)
miscellaneous_args=(
  --flow_shift 5
  --seed 1000
)
dmd_args=(
  --dmd_denoising_steps '1000,757,522'
  --min_timestep_ratio 0.02
  --max_timestep_ratio 0.98
  --generator_update_interval 5
  --real_score_guidance_scale 3
  --simulate_generator_forward
  --log_visualization # disable if oom
)
torchrun --nproc_per_node 8 fastvideo/training/wan_distillation_pipeline.py "${training_args[@]}" \
    "${model_args[@]}" "${optimizer_args[@]}" "${miscellaneous_args[@]}" "${dmd_args[@]}"
"""

# hao-ai-lab/FastVideo examples/train/configs/distribution_matching/wan/dmd2_t2v.yaml
MODULAR_YAML = """# DMD2 distillation: Wan 2.1 T2V 1.3B (teacher 50-step -> student 4-step).
#
# - Teacher: frozen pretrained Wan 2.1 T2V 1.3B
# - Student: trainable, initialized from the same pretrained weights
# - Critic:  trainable, initialized from the same pretrained weights
# - Validation: 4-step SDE sampling

models:
  student:
    _target_: fastvideo.train.models.wan.WanModel
    init_from: Wan-AI/Wan2.1-T2V-1.3B-Diffusers
    trainable: true
  teacher:
    _target_: fastvideo.train.models.wan.WanModel
    init_from: Wan-AI/Wan2.1-T2V-1.3B-Diffusers
    trainable: false
    disable_custom_init_weights: true
  critic:
    _target_: fastvideo.train.models.wan.WanModel
    init_from: Wan-AI/Wan2.1-T2V-1.3B-Diffusers
    trainable: true
    disable_custom_init_weights: true

method:
  _target_: fastvideo.train.methods.distribution_matching.dmd2.DMD2Method
  rollout_mode: simulate
  generator_update_interval: 5
  real_score_guidance_scale: 4.5
  dmd_denoising_steps: [1000, 750, 500, 250]

  # Critic optimizer (required - no fallback to training.optimizer)
  fake_score_learning_rate: 8.0e-6
  fake_score_betas: [0.0, 0.999]
  fake_score_lr_scheduler: constant

training:
  distributed:
    num_gpus: 4
    sp_size: 1
    tp_size: 1
    hsdp_replicate_dim: 1
    hsdp_shard_dim: 4

  data:
    data_path: data/Wan-Syn_77x448x832_600k
    dataloader_num_workers: 4
    train_batch_size: 1
    training_cfg_rate: 0.0
    seed: 1000
    num_latent_t: 20
    num_height: 448
    num_width: 832
    num_frames: 77

  optimizer:
    learning_rate: 2.0e-6
    betas: [0.0, 0.999]
    weight_decay: 0.01
    lr_scheduler: constant
    lr_warmup_steps: 0

  loop:
    max_train_steps: 4000
    gradient_accumulation_steps: 1

  checkpoint:
    output_dir: outputs/wan2.1_dmd2_4steps
    training_state_checkpointing_steps: 20
    checkpoints_total_limit: 3

  tracker:
    project_name: distillation_wan
    run_name: wan2.1_dmd2_4steps

  model:
    enable_gradient_checkpointing_type: full

callbacks:
  grad_clip:
    max_grad_norm: 1.0
  validation:
    pipeline_target: fastvideo.pipelines.basic.wan.wan_dmd_pipeline.WanDMDPipeline
    dataset_file: examples/training/finetune/Wan2.1-VSA/Wan-Syn-Data/validation_4.json
    every_steps: 50
    sampling_steps: [4]
    sampling_timesteps: [1000, 750, 500, 250]
    guidance_scale: 6.0
  ema:
    _target_: fastvideo.train.callbacks.ema.EMACallback
    decay: 0.98
    start_iter: 0        # delay EMA updates until this iteration

pipeline:
  flow_shift: 8
"""


def _convert(tmp_path, name, text):
    src = tmp_path / name
    src.write_text(text)
    out = tmp_path / f"{name}.megadmd.yaml"
    result = convert_fastvideo_config(str(src), str(out))
    return result, resolve(str(out))


def _targets(result):
    return {r.source: (r.target, r.status, r.note) for r in result.rows}


def test_legacy_launch_script_keeps_the_offset_cfg_form(tmp_path):
    result, cfg = _convert(tmp_path, "distill_dmd_t2v_1.3B.slurm", LEGACY_1_3B)
    assert cfg.preset == "wan2.1-t2v-1.3b"
    assert (cfg.dmd.cfg_form, cfg.dmd.guidance_scale) == ("offset", 3.5)  # = standard 4.5
    assert cfg.dmd.denoising_steps == [1000, 757, 522] and cfg.dmd.flow_shift == 8.0
    assert (cfg.dmd.min_timestep_ratio, cfg.dmd.max_timestep_ratio) == (0.02, 0.98)
    assert cfg.dmd.generator_update_interval == 5 and not cfg.dmd.simulate_generator_forward
    assert cfg.optim.generator.lr == 2e-6 and cfg.optim.fake_score.lr == 2e-6  # FastVideo: critic lr = student's
    assert cfg.optim.generator.weight_decay == 0.01 and cfg.optim.generator.betas == [0.9, 0.999]
    assert (cfg.optim.generator.scheduler, cfg.optim.generator.warmup_steps) == ("constant", 0)
    assert (cfg.train.max_steps, cfg.train.micro_batch_size, cfg.train.seed, cfg.train.max_grad_norm) == (4000, 1, 1000, 1.0)
    assert cfg.ema.decay == 0.999  # FastVideo's CLI default, on in every legacy run
    assert (cfg.checkpoint.interval_steps, cfg.checkpoint.keep_last, cfg.validation.interval_steps) == (500, 3, 200)
    assert cfg.model.activation_checkpointing.generator and cfg.model.activation_checkpointing.teacher
    assert cfg.model.teacher_path == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" and cfg.data.path == "your_data_dir"
    rows = _targets(result)
    assert rows["--real_score_guidance_scale 3.5"][1] == "mapped" and "standard CFG 4.5" in rows["--real_score_guidance_scale 3.5"][2]
    assert rows["--hsdp_replicate_dim 64"][1] == "unsupported" and rows["--data_path your_data_dir"][1] == "changed"
    # every flag the script passes has its row
    _, tokens = script_args(LEGACY_1_3B)
    assert {v[1] for v in parse_flags(tokens).values()} <= set(rows)


def test_legacy_wan22_script_gives_the_preset_schedule(tmp_path):
    _, cfg = _convert(tmp_path, "distill_dmd_t2v_5B.sh", LEGACY_5B_FLAGS)
    assert cfg.preset == "wan2.2-ti2v-5b" and (cfg.dmd.cfg_form, cfg.dmd.guidance_scale) == ("offset", 3.0)
    for role, lr in (("generator", 4e-6), ("fake_score", 2e-6)):
        o = getattr(cfg.optim, role)
        assert (o.lr, o.scheduler, o.warmup_steps, o.min_lr_ratio) == (lr, "cosine_with_min_lr", 100, 0.5)
    assert cfg.dmd.simulate_generator_forward and cfg.data.latent_shape == [48, 31, 44, 80]
    assert cfg.train.max_steps == 4000 and cfg.dmd.flow_shift == 5.0
    preset = resolve(None, ["preset=wan2.2-ti2v-5b"])
    assert cfg.optim == preset.optim and cfg.train.max_steps == preset.train.max_steps


def test_modular_yaml_uses_the_standard_cfg_form(tmp_path):
    result, cfg = _convert(tmp_path, "dmd2_t2v.yaml", MODULAR_YAML)
    assert (cfg.dmd.cfg_form, cfg.dmd.guidance_scale) == ("standard", 4.5)  # not standard 5.5
    assert cfg.dmd.denoising_steps == [1000, 750, 500, 250] and cfg.dmd.flow_shift == 8.0
    assert (cfg.dmd.min_timestep_ratio, cfg.dmd.max_timestep_ratio) == (0.0, 1.0)  # DMD2Method's defaults
    assert cfg.dmd.simulate_generator_forward and cfg.data.latent_shape == [16, 20, 56, 104]
    assert (cfg.optim.generator.lr, cfg.optim.fake_score.lr) == (2e-6, 8e-6)
    assert cfg.optim.generator.betas == [0.0, 0.999] == cfg.optim.fake_score.betas
    assert cfg.ema.decay == 0.98 and cfg.train.max_grad_norm == 1.0 and cfg.train.max_steps == 4000
    assert (cfg.checkpoint.interval_steps, cfg.validation.interval_steps) == (20, 50)
    rows = _targets(result)
    assert rows["method.real_score_guidance_scale: 4.5"][0] == "dmd.guidance_scale=4.5, dmd.cfg_form=standard"
    assert rows["training.tracker.project_name: distillation_wan"][1] == "unsupported"
    assert all(r.status in ("mapped", "changed", "unsupported") for r in result.rows)


def test_the_cli_prints_the_table_and_keeps_existing_files(tmp_path):
    src = tmp_path / "dmd2_t2v.yaml"
    src.write_text(MODULAR_YAML)
    out = tmp_path / "run.yaml"
    r = CliRunner().invoke(main, ["convert", "from-fastvideo-config", str(src), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "method.real_score_guidance_scale: 4.5" in r.output and "CFG: standard form, scale 4.5" in r.output
    r = CliRunner().invoke(main, ["convert", "from-fastvideo-config", str(src), "-o", str(out)])
    assert r.exit_code == 2 and "exists; pass --overwrite to replace it" in r.output
    r = CliRunner().invoke(main, ["convert", "from-fastvideo-config", str(src), "-o", str(out), "--overwrite"])
    assert r.exit_code == 0


@pytest.mark.parametrize("name,text,message", [
    ("sf.sh", "torchrun fastvideo/training/wan_self_forcing_distillation_pipeline.py --seed 1",
     "self-forcing (causal) trainer"),
    ("sf.yaml", "method: {_target_: fastvideo.train.methods.distribution_matching.self_forcing.SelfForcingMethod}",
     "megadmd converts FastVideo's DMD2Method configs"),
    ("empty.sh", "echo hello", "holds no FastVideo flags"),
])
def test_other_trainers_are_refused_with_one_line(tmp_path, name, text, message):
    src = tmp_path / name
    src.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        convert_fastvideo_config(str(src), str(tmp_path / "out.yaml"))
    assert not (tmp_path / "out.yaml").exists()
