"""A tiny Wan2.2 two-expert model through train -> checkpoint -> resume -> export -> WanPipeline."""
import subprocess
import sys

import torch

from tests.helpers import cli_env, save_test_dataset, save_tiny_wan22_pipeline, spawn


def _overrides(base, data, out, *extra):
    return [f"output_dir={out}", f"model.teacher_path={base}", f"data.path={data}", "model.boundary_ratio=0.875",
            "dmd.denoising_steps=[1000,500]", "train.max_steps=4", "dmd.generator_update_interval=1",
            "ema.decay=0.5", "logging.interval_steps=1", "train.micro_batch_size=2", "optim.generator.lr=1e-3",
            *extra]


def megadmd(*args):
    return subprocess.run([sys.executable, "-m", "megadmd", *map(str, args)], env=cli_env(), capture_output=True,
                          text=True, timeout=600)


def test_two_experts_round_trip(tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from diffusers import WanPipeline

    from megadmd.models import WanExperts, predict_velocity
    from megadmd.pipeline import DMDScheduler, use_dmd_scheduler
    from megadmd.pipeline.scheduler import draw_renoise, renoise_generators
    from megadmd.sampling import sample_generator
    from tests.distributed.workers import load_and_gather

    base = save_tiny_wan22_pipeline(tmp_path / "wan22")
    data = save_test_dataset(tmp_path / "data", num_samples=8)
    run = tmp_path / "run"
    args = ["train"] + [a for o in _overrides(base, data, run) for a in ("--set", o)]
    r = megadmd(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = run / "checkpoints" / "step-00000004"
    assert (ckpt / "generator" / "config_2.json").is_file()
    # resume: every expert's weights and the EMA come back
    spawn(load_and_gather, 1, _overrides(base, data, run, "checkpoint.resume=auto", "train.max_steps=5"),
          str(tmp_path / "resumed.pt"))
    got = torch.load(tmp_path / "resumed.pt", weights_only=False)
    saved = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "generator"), tag="zero")
    assert {k.split(".")[0] for k in saved} == {"high", "low"}
    assert all(torch.equal(got["generator"][k], v) for k, v in saved.items())
    # export the EMA as a complete Wan2.2 pipeline and sample it with diffusers
    r = megadmd("export-ema", ckpt, "-o", tmp_path / "shipped", "--pipeline-from", base)
    assert r.returncode == 0, r.stderr[-3000:]
    pipe = WanPipeline.from_pretrained(str(tmp_path / "shipped"))
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.875
    pipe.scheduler.set_timesteps(2)  # diffusers' own scheduler on the run's steps
    assert pipe.scheduler.config.stochastic_sampling and pipe.scheduler.timesteps.tolist() == [1000.0, 500.0]
    assert isinstance(use_dmd_scheduler(pipe), DMDScheduler)  # the seeded re-noise ours draws
    start = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = pipe(prompt="a dog runs", height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=1.0,
               latents=start.clone(), output_type="latent", max_sequence_length=16).frames
    text, _ = pipe.encode_prompt("a dog runs", do_classifier_free_guidance=False, max_sequence_length=16)
    experts = WanExperts(pipe.transformer, pipe.transformer_2, 0.875)
    gens = renoise_generators(start)
    with torch.no_grad():
        ours = sample_generator(lambda x, t: predict_velocity(experts, x, t, text, torch.float32), [1000, 500], start,
                                lambda i: draw_renoise(gens, start.shape, "cpu"))
    assert torch.allclose(out, ours, atol=1e-4)  # step 1000: high-noise expert, step 500: low-noise
    # the generator itself converts to transformer + transformer_2 as well
    r = megadmd("convert", "to-diffusers", ckpt, "-o", tmp_path / "gen")
    assert r.returncode == 0 and (tmp_path / "gen" / "transformer_2" / "config.json").is_file()
