"""The config tree: presets, files, overrides, and errors that name the key."""
import json
import types

import pytest

from megadmd.config import ConfigError, RunConfig, apply_dict, parse_override, resolve, save_resolved


def test_default_is_the_tiny_preset():
    cfg = resolve()
    assert cfg.preset == "tiny"
    assert cfg.dmd.denoising_steps == [1000, 757, 522]
    assert cfg.dmd.cfg_form == "offset" and cfg.dmd.guidance_scale == 3.5


def test_the_toy_recipe_applies_on_the_built_in_data_only():
    """The tiny preset's recipe tuned on the toy (its regression needs the toy teacher's pairs)
    applies when the run trains on the built-in data; a dataset of one's own gets plain DMD2."""
    toy = resolve()
    assert toy.dmd.regression.weight == 1.0 and toy.dmd.regression.num_steps == 1
    assert toy.dmd.simulate_generator_forward and not toy.dmd.train_first_step
    assert toy.dmd.guidance_interval == [0.0, 0.75] and toy.train.max_steps == 400
    assert toy.dmd.generator_update_interval == 2 and toy.deepspeed.leaf_blocks
    assert toy.ema.decay == 0.9 and toy.ema.start_step == 150
    assert toy.dmd.gan.generator_weight == 1.0 and toy.dmd.gan.enabled
    own = resolve(overrides=["data.path=/somewhere"])
    assert own.dmd.regression.weight == 0.0 and not own.dmd.simulate_generator_forward
    assert own.dmd.train_first_step and own.train.max_steps == 125 and own.optim.generator.lr == 5e-5
    assert own.dmd.generator_update_interval == 5 and not own.deepspeed.leaf_blocks and own.ema.decay == 0.0
    assert own.dmd.gan.generator_weight == 1e-3 and not own.dmd.gan.enabled
    # the tiny model's one torch thread comes with the preset, whatever the data; the plain default is torch's
    assert toy.train.cpu_threads == 1 and own.train.cpu_threads == 1
    assert RunConfig().train.cpu_threads == 0 and resolve(overrides=["preset=wan2.1-t2v-1.3b"]).train.cpu_threads == 0
    # the user's file and overrides still come last
    assert resolve(overrides=["dmd.regression.weight=0", "train.max_steps=7"]).dmd.regression.weight == 0.0
    assert resolve(overrides=["data.path=/x", "dmd.regression.weight=2"]).dmd.regression.weight == 2.0


def test_spec_defaults_without_a_preset_recipe():
    cfg = RunConfig()
    assert cfg.dmd.min_timestep_ratio == 0.2 and cfg.dmd.max_timestep_ratio == 0.98
    assert cfg.dmd.generator_update_interval == 5
    assert cfg.train.max_grad_norm == 1.0
    assert cfg.dmd.grad_norm_mean == "sample"


def test_wan_preset_uses_published_recipe():
    cfg = resolve(overrides=["preset=wan2.1-t2v-1.3b"])
    assert cfg.dmd.flow_shift == 8.0
    assert cfg.dmd.min_timestep_ratio == 0.02 and cfg.dmd.max_timestep_ratio == 0.98


def test_file_then_overrides_win(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"dmd": {"guidance_scale": 2.0, "flow_shift": 5}, "train": {"max_steps": 7}}))
    cfg = resolve(str(f), ["dmd.guidance_scale=4.5", "optim.generator.betas=[0.0,0.99]"])
    assert cfg.dmd.guidance_scale == 4.5
    assert cfg.dmd.flow_shift == 5.0 and isinstance(cfg.dmd.flow_shift, float)
    assert cfg.train.max_steps == 7
    assert cfg.optim.generator.betas == [0.0, 0.99]


def test_yaml_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("dmd:\n  cfg_form: standard\n  guidance_scale: 4.5\n")
    cfg = resolve(str(f))
    assert cfg.dmd.cfg_form == "standard"


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'dmd.guidance'"):
        resolve(overrides=["dmd.guidance=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="'train.max_steps' must be int"):
        resolve(overrides=["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="'dmd.simulate_generator_forward' must be bool"):
        apply_dict(RunConfig(), {"dmd": {"simulate_generator_forward": 1}})


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="dmd.cfg_form"):
        resolve(overrides=["dmd.cfg_form=both"])
    with pytest.raises(ConfigError, match="decreasing"):
        resolve(overrides=["dmd.denoising_steps=[522,757,1000]"])
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve(overrides=["preset=sd15"])
    with pytest.raises(ConfigError, match="dmd.train_first_step=false needs at least two dmd.denoising_steps"):
        resolve(overrides=["dmd.train_first_step=false", "dmd.denoising_steps=[1000]"])
    for bad in ("[0.5]", "[0.8,0.3]", "[0.2,1.5]", "[0.5,true]"):
        with pytest.raises(ConfigError, match=r"dmd.guidance_interval must be \[lo, hi\]"):
            resolve(overrides=[f"dmd.guidance_interval={bad}"])


def test_override_parsing():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=1000,757,522") == {"a": [1000, 757, 522]}
    assert parse_override("p=wan2.1-t2v-1.3b") == {"p": "wan2.1-t2v-1.3b"}
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        resolve("/nonexistent/run.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = resolve(overrides=["dmd.guidance_scale=2.5"])
    save_resolved(cfg, tmp_path / "config.json")
    again = resolve(str(tmp_path / "config.json"))
    assert again == cfg


def test_wan22_presets_resolve_with_their_recipes():
    ti2v = resolve(overrides=["preset=wan2.2-ti2v-5b"])
    assert ti2v.dmd.flow_shift == 5.0 and ti2v.dmd.simulate_generator_forward
    moe = resolve(overrides=["preset=wan2.2-t2v-a14b"])
    assert moe.model.boundary_ratio == 0.875 and moe.dmd.denoising_steps == [1000, 750, 500, 250]
    assert moe.dmd.flow_shift == 12.0


def test_generator_and_fake_score_default_to_the_teacher_path(tmp_path, test_model_dir):
    import shutil

    from megadmd.preflight import check_models

    cfg = resolve(overrides=[f"model.teacher_path={test_model_dir}"])
    paths = check_models(cfg)[0]
    assert paths["generator"] == paths["fake_score"] == paths["teacher"]
    other = tmp_path / "other"
    shutil.copytree(test_model_dir, other)
    paths = check_models(resolve(overrides=[f"model.teacher_path={test_model_dir}",
                                            f"model.generator_path={other}"]))[0]
    assert paths["generator"] != paths["teacher"] == paths["fake_score"]


def test_gan_needs_real_latents_not_a_training_mode(tmp_path, test_model_dir, test_dataset_dir):
    from megadmd.preflight import preflight_train
    from tests.helpers import save_test_dataset

    text = save_test_dataset(tmp_path / "text", num_samples=4, text_only=True)
    base = [f"model.teacher_path={test_model_dir}", f"output_dir={tmp_path / 'o'}", "dmd.gan.enabled=true",
            "dmd.simulate_generator_forward=true", "data.latent_shape=[4,2,4,4]"]
    with pytest.raises(ConfigError, match="dmd.gan.enabled needs real latents"):
        preflight_train(resolve(overrides=[*base, f"data.path={text}"]), 1)
    # data-free mode with a dataset that has latents: the GAN reads them as the real side
    preflight_train(resolve(overrides=[*base, f"data.path={test_dataset_dir}"]), 1)
    for bad in ("dmd.gan.timestep_range=[0.5,0.2]", "dmd.gan.pooling=max", "dmd.gan.head_lr_scale=0",
                "dmd.gan.head_betas=[0.9]"):
        with pytest.raises(ConfigError, match="dmd.gan"):
            resolve(overrides=["dmd.gan.enabled=true", bad])
    for bad in ("validation.noises_per_prompt=1", "validation.extreme_threshold=0"):
        with pytest.raises(ConfigError, match="validation"):
            resolve(overrides=[bad])


def _float_keys(obj, prefix="") -> list:
    import dataclasses

    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _float_keys(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            keys.append(f"{prefix}{f.name}")
    return keys


def test_nan_and_infinity_are_refused_in_every_number_of_the_tree():
    """Every comparison with NaN is false, so range checks alone let NaN through: a NaN
    guidance scale gave a zero loss and a zero gradient, a NaN learning rate NaN weights."""
    keys = _float_keys(RunConfig()) + ["model.boundary_ratio"]
    assert len(keys) >= 19 and "dmd.guidance_scale" in keys and "optim.generator.lr" in keys
    for key in keys:
        for bad in ("NaN", "Infinity", "-Infinity"):
            with pytest.raises(ConfigError, match=f"config key '{key}' must be a finite number"):
                resolve(overrides=[f"{key}={bad}"])
    for key, bad in (("dmd.denoising_steps", "[1000,NaN]"), ("optim.fake_score.betas", "[0.9,Infinity]"),
                     ("dmd.guidance_interval", "[0,NaN]")):
        with pytest.raises(ConfigError, match=rf"config key '{key}\[\d\]' must be a finite number"):
            resolve(overrides=[f"{key}={bad}"])


def test_nan_in_a_yaml_file_is_refused(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("dmd:\n  flow_shift: .inf\n")
    with pytest.raises(ConfigError, match="'dmd.flow_shift' must be a finite number, got inf"):
        resolve(str(f))


@pytest.mark.parametrize("override, message", [
    ("dmd.guidance_scale=-5", "dmd.guidance_scale must be >= 0"),
    ('optim.generator.betas=["a","b"]', r"optim.generator.betas must be two numbers in \[0, 1\)"),
    ("optim.generator.betas=[0.9,true]", r"optim.generator.betas must be two numbers"),
    ("dmd.denoising_steps=[1000,true]", r"dmd.denoising_steps entries must be numbers in \(0, 1000\], got True"),
    ("dmd.denoising_steps=1000,abc", "dmd.denoising_steps entries must be numbers in .* got 'abc'"),
    ("dmd.denoising_steps=[]", "dmd.denoising_steps must list at least one timestep"),
    ("optim.fake_score.lr=0", "optim.fake_score.lr must be positive"),
    ("optim.generator.eps=0", "optim.generator.eps must be positive"),
    ("optim.generator.weight_decay=-0.1", "optim.generator.weight_decay must be >= 0"),
    ("dmd.flow_shift=-1", "dmd.flow_shift must be positive"),
    ("train.max_grad_norm=-1", "train.max_grad_norm must be >= 0"),
    ("train.nonfinite=ignore", "train.nonfinite must be one of skip, stop"),
    ("train.max_consecutive_skips=-1", "train.max_consecutive_skips must be >= 0"),
    ("train.cpu_threads=-1", "train.cpu_threads must be >= 0"),
    ('data.latent_shape=[4,"a",4,4]', r"data.latent_shape must be \[C, F, H, W\], four positive integers"),
    ("data.latent_shape=[4,2,4]", r"data.latent_shape must be \[C, F, H, W\]"),
])
def test_out_of_range_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve(overrides=[override])


def test_non_utf8_config_file_is_one_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_bytes(b"dmd:\n  cfg_form: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"config file .*run.yaml is not UTF-8 text \(byte 17\)"):
        resolve(str(f))


def test_nonfinite_defaults():
    cfg = resolve()
    assert cfg.train.nonfinite == "skip" and cfg.train.max_consecutive_skips == 10


def test_run_train_sets_the_threads_for_the_run_and_restores_the_callers(monkeypatch):
    """train.cpu_threads is process-wide: run_train sets it for the run and gives an in-process
    caller its own count back, also when the run raises; 0 leaves the count alone."""
    import torch

    from megadmd import runner

    seen = []

    def fake_train(cfg, local_rank, overwrite):
        seen.append(torch.get_num_threads())
        if cfg.train.max_steps == 13:
            raise RuntimeError("boom")
        return types.SimpleNamespace(preempted=False, state=types.SimpleNamespace(
            step=1, generator_updates=0, fake_score_updates=1, generator_skipped=0, fake_score_skipped=0))

    monkeypatch.setattr(runner, "_train", fake_train)
    caller = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        runner.run_train(resolve(overrides=["train.cpu_threads=1"]))
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"):
            runner.run_train(resolve(overrides=["train.cpu_threads=1", "train.max_steps=13"]))
        assert seen == [1, 1] and torch.get_num_threads() == 2
        runner.run_train(resolve(overrides=["train.cpu_threads=0"]))
        assert seen == [1, 1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(caller)
