"""The config tree: presets, files, overrides, and errors that name the key."""
import json

import pytest

from megadmd.config import ConfigError, RunConfig, apply_dict, parse_override, resolve, save_resolved


def test_default_is_the_tiny_preset():
    cfg = resolve()
    assert cfg.preset == "tiny"
    assert cfg.dmd.denoising_steps == [1000, 757, 522]
    assert cfg.dmd.cfg_form == "offset" and cfg.dmd.guidance_scale == 3.5


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
