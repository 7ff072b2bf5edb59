"""Coming from FastVideo or plain DeepSpeed: train on FastVideo parquet data (T2V and I2V) with a
user's full DeepSpeed JSON, then run DeepSpeed's own zero_to_fp32.py and ds_to_universal on the
checkpoint as a DeepSpeed user would."""
import copy
import json
import runpy
import subprocess
import sys

import pytest
import torch

from megadmd.config import resolve
from megadmd.data.format import open_dataset, write_negative
from megadmd.data.loader import BatchSource
from megadmd.runner import run_train
from tests.helpers import TEST_I2V_CONFIG, TEST_TEXT_DIM, cli_env, save_test_model
from tests.helpers_fastvideo import make_samples, write_fastvideo_dataset, write_megadmd_dataset, write_vae_config
from tests.unit.test_deepspeed_json import DOCS_JSON

NEG = torch.randn(4, TEST_TEXT_DIM, generator=torch.Generator().manual_seed(11))


def _user_ds_json(path):
    """DeepSpeed's documentation JSON with megadmd's values as "auto" (HF style), no CPU offload."""
    cfg = copy.deepcopy(DOCS_JSON)
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        cfg[k] = "auto"
    cfg["bf16"] = {"enabled": "auto"}
    cfg["optimizer"]["params"] = {k: "auto" for k in cfg["optimizer"]["params"]}
    for k in ("offload_optimizer", "offload_param"):
        del cfg["zero_optimization"][k]
    for k in ("tensorboard", "csv_monitor", "flops_profiler"):
        cfg[k]["enabled"] = False
    path.write_text(json.dumps(cfg))
    return path


def _train(root, kind, data, teacher, extra=()):
    out = root / f"run-{kind}-{data.name}"
    cfg = resolve(overrides=[
        f"model.teacher_path={teacher}", f"data.path={data}", f"output_dir={out}", "train.max_steps=1",
        "train.micro_batch_size=2", "dmd.generator_update_interval=1", "logging.interval_steps=1",
        "logging.tensorboard=false", "checkpoint.interval_steps=0", *extra])
    return run_train(cfg), out


@pytest.fixture(scope="module")
def t2v(tmp_path_factory, test_model_dir, single_process_world):
    root = tmp_path_factory.mktemp("fv_t2v")
    samples = make_samples(6, "t2v")
    write_negative(root / "neg", NEG, "blurry, static")
    parts = {"root": root, "teacher": test_model_dir,
             "fastvideo": write_fastvideo_dataset(root / "fastvideo", samples, "t2v", rows_per_file=4),
             "ours": write_megadmd_dataset(root / "ours", samples, NEG, "t2v"),
             "ds_json": _user_ds_json(root / "ds_config.json")}
    common = [f"deepspeed.generator={parts['ds_json']}"]
    parts["trainer"], parts["out"] = _train(root, "t2v", parts["fastvideo"], test_model_dir, [
        *common, f"data.negative_path={root / 'neg'}", f"data.vae_path={write_vae_config(root / 'vae')}"])
    parts["ours_trainer"], parts["ours_out"] = _train(root, "t2v", parts["ours"], test_model_dir, common)
    return parts


def _first_batches_equal(trainer, ours_path):
    ours = BatchSource(open_dataset(ours_path), micro_batch=2, dp_rank=0, dp_size=1, seed=trainer.cfg.train.seed,
                       text_len=trainer.data.text_len)
    a, b = trainer.data.collate(trainer.data.positions_for(0)), ours.collate(ours.positions_for(0))
    assert a.captions == b.captions and torch.equal(a.text_embeds, b.text_embeds)
    assert torch.equal(a.text_mask, b.text_mask) and torch.equal(trainer.data.negative(2), ours.negative(2))
    for field in ("latents", "image_latents", "image_embeds"):
        u, v = getattr(a, field), getattr(b, field)
        assert (u is None and v is None) or torch.equal(u, v), field


def test_t2v_trains_on_the_same_batches_as_our_format(t2v):
    trainer = t2v["trainer"]
    assert trainer.state.step == 1 and trainer.state.generator_updates == 1
    assert trainer.data.dataset.info.extra["schema"] == "t2v"
    assert trainer.data.text_len == 512  # FastVideo pads text to 512 tokens
    _first_batches_equal(trainer, t2v["ours"])
    # the same data gives the same iteration: losses and updated generator weights agree
    (_, a), (_, b) = trainer.history[-1], t2v["ours_trainer"].history[-1]
    assert a["loss/generator"] == b["loss/generator"] and a["loss/fake_score"] == b["loss/fake_score"]
    from megadmd.convert import role_state_dict

    sa, _ = role_state_dict(t2v["out"] / "checkpoints" / "step-00000001", "generator")
    sb, _ = role_state_dict(t2v["ours_out"] / "checkpoints" / "step-00000001", "generator")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (t2v["out"] / "fastvideo_index.json").is_file()


def test_zero_to_fp32_runs_as_a_deepspeed_user_runs_it(t2v, tmp_path):
    from megadmd.convert import role_state_dict

    ckpt = t2v["out"] / "checkpoints" / "step-00000001"
    role_dir = ckpt / "generator"
    assert (role_dir / "latest").read_text() == "zero" and (role_dir / "zero_to_fp32.py").is_file()
    r = subprocess.run([sys.executable, "zero_to_fp32.py", ".", str(tmp_path / "fp32")], cwd=role_dir, env=cli_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    files = list((tmp_path / "fp32").iterdir())
    state = {}
    for f in files:
        if f.suffix == ".bin":
            state.update(torch.load(f, weights_only=True))
    ours, _ = role_state_dict(ckpt, "generator")
    assert state.keys() == ours.keys() and all(torch.equal(state[k].float(), ours[k]) for k in ours)


def test_ds_to_universal_runs_as_a_deepspeed_user_runs_it(t2v, tmp_path):
    from megadmd.convert import role_state_dict

    ckpt = t2v["out"] / "checkpoints" / "step-00000001"
    out = tmp_path / "universal" / "zero_universal"
    # `python -m deepspeed.checkpoint.ds_to_universal ...`, run in this process (runpy runs the module
    # as __main__, as -m does) to spare a second DeepSpeed import
    argv = sys.argv
    sys.argv = ["ds_to_universal", "--input_folder", str(ckpt / "fake_score" / "zero"), "--output_folder", str(out),
                "--num_extract_workers", "1", "--num_merge_workers", "1"]
    try:
        runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__")
    finally:
        sys.argv = argv
    assert (out.parent / "latest_universal").read_text() == "zero_universal"
    ours, _ = role_state_dict(ckpt, "fake_score")
    for name, value in ours.items():
        saved = torch.load(out / "zero" / name / "fp32.pt", weights_only=False)
        saved = saved["param"] if isinstance(saved, dict) else saved  # the layout differs across versions
        assert torch.equal(saved.view_as(value), value), name


def test_i2v_trains_on_fastvideo_data(tmp_path, single_process_world):
    samples = make_samples(5, "i2v")
    fastvideo = write_fastvideo_dataset(tmp_path / "fastvideo", samples, "i2v", rows_per_file=2)
    ours = write_megadmd_dataset(tmp_path / "ours", samples, NEG, "i2v")
    teacher = save_test_model(tmp_path / "teacher", config=TEST_I2V_CONFIG)
    trainer, _ = _train(tmp_path, "i2v", fastvideo, teacher, [
        f"data.negative_path={ours}", f"data.vae_path={write_vae_config(tmp_path / 'vae')}"])
    assert trainer.state.generator_updates == 1 and trainer.data.dataset.info.extra["schema"] == "i2v"
    assert all(torch.isfinite(torch.tensor(v)) for k, v in trainer.history[-1][1].items() if k.startswith("loss/"))
    _first_batches_equal(trainer, ours)


@pytest.mark.parametrize("data,extra,message", [
    ("fastvideo", [], "FastVideo datasets hold no negative-prompt embedding"),
    ("ours", ["data.vae_path=/models/vae"], "data.vae_path is for FastVideo datasets"),
])
def test_data_settings_that_do_not_fit_are_refused_with_one_line(t2v, tmp_path, data, extra, message):
    from click.testing import CliRunner

    from megadmd.cli import main

    sets = [f"data.path={t2v[data]}", f"model.teacher_path={t2v['teacher']}", *extra]
    r = CliRunner().invoke(main, ["train", "-o", str(tmp_path / "never"), *[a for x in sets for a in ("--set", x)]])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.startswith("megadmd: error:")]
    assert len(lines) == 1 and message in lines[0], r.output
    assert not (tmp_path / "never").exists()
