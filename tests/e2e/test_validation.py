"""Validation during training: fixed prompts sampled by the generator and its EMA, logged to
TensorBoard as images, and decoded to frames and mp4 when a VAE is configured."""
import subprocess
import sys

from tests.helpers import cli_env, save_test_dataset, save_test_model, save_tiny_vae


def test_validation_logs_generator_and_ema_samples(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, data = save_test_model(tmp_path / "m"), save_test_dataset(tmp_path / "d", num_samples=6)
    vae = save_tiny_vae(tmp_path / "vae")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "megadmd", "train", "-o", str(out), "--max-steps", "4",
                        "--set", f"data.path={data}", "--set", f"model.teacher_path={model}",
                        "--set", "dmd.generator_update_interval=2", "--set", "ema.decay=0.9",
                        "--set", "validation.interval_steps=2", "--set", "validation.num_samples=2",
                        "--set", f"validation.vae_path={vae}"], env=cli_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    # the label-free statistics: two noises per prompt by default, the data's x0 as the reference
    scalars = set(acc.Tags()["scalars"])
    for name in ("generator", "ema"):
        for stat in ("diversity", "x0_std", "x0_abs_mean", "x0_extreme_share"):
            assert f"validation/{name}/{stat}" in scalars, (name, stat, scalars)
    assert [e.step for e in acc.Scalars("validation/generator/diversity")] == [2, 4]
    assert acc.Scalars("validation/generator/diversity")[0].value > 0
    assert "validation/data/x0_std" in scalars
    images = set(acc.Tags()["images"])
    for tag in ("validation/generator/0", "validation/generator/1", "validation/ema/0",
                "validation/generator_frames/0", "validation/ema_frames/1"):
        assert tag in images, (tag, images)
    assert [e.step for e in acc.Images("validation/generator/0")] == [2, 4]
    for step in (2, 4):
        assert (out / "validation" / f"step-{step:08d}" / "generator_00.mp4").stat().st_size > 0
        assert (out / "validation" / f"step-{step:08d}" / "ema_01.mp4").stat().st_size > 0
