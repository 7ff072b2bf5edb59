"""LoRA runs as users meet them: SIGTERM, save and exact resume with the GAN term, the EMA, VSA and
validation on; then the two exports -- the adapter loaded by WanPipeline.load_lora_weights and
the merged transformer -- for one expert and for a Wan2.2 two-expert pipeline."""
import json
import os
import signal

import pytest
import torch
from click.testing import CliRunner

from megadmd.cli import main
from megadmd.config import resolve
from megadmd.runner import run_train
from tests.helpers import save_test_dataset, save_test_model, save_tiny_text_encoder, save_tiny_vae

STEPS = 4  # checkpoints at 3 (periodic) and 4 (the last); the SIGTERM save at 2 is neither
LAST = f"step-{STEPS:08d}"
LORA = ["model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=8", "optim.generator.lr=1e-2",
        "optim.fake_score.lr=1e-2", "logging.tensorboard=false", "logging.interval_steps=1"]


def _overrides(model, data, out, *extra):
    return [f"output_dir={out}", f"train.max_steps={STEPS}", f"data.path={data}", f"model.teacher_path={model}",
            "checkpoint.interval_steps=3", "checkpoint.keep_last=0", "dmd.generator_update_interval=2",
            "ema.decay=0.5", "dmd.gan.enabled=true", "dmd.gan.hidden_dim=16", "attention.vsa_sparsity=0.5",
            "attention.vsa_backend=torch", "validation.interval_steps=3", "validation.num_samples=2",
            "train.micro_batch_size=2", *LORA, *extra]


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def reference(tmp_path_factory, single_process_world):
    root = tmp_path_factory.mktemp("lora")
    model = save_test_model(root / "teacher")
    data = save_test_dataset(root / "data", num_samples=8, latent_shape=[4, 4, 16, 16])  # 4 x 8 x 8: 4 VSA cubes
    trainer = run_train(resolve(overrides=_overrides(model, data, root / "ref")))
    return root, model, data, trainer


def _checkpoint_weights(ckpt):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    out = {r: get_fp32_state_dict_from_zero_checkpoint(str(ckpt / r), tag="zero") for r in ("generator", "fake_score")}
    out["ema"] = load_file(str(ckpt / "ema" / "ema.safetensors"))
    return out


def test_sigterm_saves_and_the_resumed_run_matches_the_uninterrupted_one(reference, tmp_path, monkeypatch):
    from megadmd.dmd.trainer import DMDTrainer

    root, model, data, ref = reference
    run = tmp_path / "run"
    step = DMDTrainer.train_step

    def step_then_sigterm(self, n):
        step(self, n)
        if n == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what Slurm sends before a preemption

    monkeypatch.setattr(DMDTrainer, "train_step", step_then_sigterm)
    stopped = run_train(resolve(overrides=_overrides(model, data, run)))
    monkeypatch.undo()
    assert stopped.preempted and stopped.state.step == 2
    assert (run / "checkpoints" / "step-00000002" / "manifest.json").is_file()
    resumed = run_train(resolve(overrides=_overrides(model, data, run, "checkpoint.resume=auto")))
    assert resumed.state.step == STEPS
    logged = dict(resumed.history)
    for n, values in ref.history:
        if n <= 2:
            continue
        for k in ("loss/generator", "loss/fake_score", "loss/discriminator", "grad_norm/fake_score"):
            if k in values:
                assert logged[n][k] == pytest.approx(values[k], rel=1e-6, abs=1e-9), (n, k)
    want = _checkpoint_weights(root / "ref" / "checkpoints" / LAST)
    got = _checkpoint_weights(run / "checkpoints" / LAST)
    for part in want:
        assert want[part].keys() == got[part].keys()
        assert all(torch.equal(want[part][k], got[part][k]) for k in want[part]), part
    assert any(".lora_B." in k for k in want["ema"]) and any(k.startswith("gan_head.") for k in want["fake_score"])


def test_validation_samples_the_adapter_and_its_ema_and_puts_the_weights_back(reference):
    from megadmd.validation import Validator
    from megadmd.zero import full_state_dict

    _, _, _, ref = reference
    validator = next(h.__self__ for h in ref.hooks if isinstance(getattr(h, "__self__", None), Validator))
    gen = ref.models.generator.module
    before = full_state_dict(gen)
    out = validator.run(ref)  # what the hook ran at step 3
    # [noises per prompt, prompts, C, F, H, W]: validation.noises_per_prompt (default 2) noises
    assert set(out) == {"generator", "ema"} and out["generator"].shape == (2, 2, 4, 4, 16, 16)
    assert not torch.allclose(out["generator"], out["ema"], atol=1e-4)  # the EMA adapter was applied
    after = full_state_dict(gen)
    assert all(torch.equal(before[k], after[k]) for k in before)  # and taken off again
    torch.testing.assert_close(validator.sample(gen, torch.float32, ref.device), out["generator"])


def _pipeline(tmp_path, transformer):
    from diffusers import AutoencoderKLWan, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    from megadmd.pipeline.scheduler import DMDScheduler

    enc = tmp_path / "umt5"
    if not enc.exists():
        save_tiny_text_encoder(enc)
        save_tiny_vae(tmp_path / "vae")
    return WanPipeline(tokenizer=AutoTokenizer.from_pretrained(str(enc)), text_encoder=UMT5EncoderModel.from_pretrained(str(enc)),
                       vae=AutoencoderKLWan.from_pretrained(str(tmp_path / "vae")), transformer=transformer,
                       scheduler=DMDScheduler(timesteps=[1000, 757, 522]))


def _sample(pipe, steps=3, seed=0):
    start = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return pipe(prompt="a cat runs on the beach", height=32, width=32, num_frames=5, num_inference_steps=steps,
                    guidance_scale=1.0, latents=start, output_type="latent", max_sequence_length=16).frames


def test_adapter_export_loads_in_wan_pipeline_and_samples_like_the_merged_export(reference, tmp_path):
    from safetensors import safe_open

    from megadmd.attention.processor import VSASettings, configure_attention
    from megadmd.models import attach_vsa_gates, load_wan

    root, model, _, ref = reference
    ckpt = root / "ref" / "checkpoints" / LAST
    for mode in ("adapter", "merged"):
        code, out = cli("convert", "to-diffusers", ckpt, "-o", tmp_path / mode, "--lora", mode)
        assert code == 0, out
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["megadmd_lora.json", "megadmd_sampling.json", "pytorch_lora_weights.safetensors",
                     "vsa_gates.safetensors"]
    with safe_open(str(tmp_path / "adapter" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert all(k.startswith("transformer.blocks.") and ".lora_" in k for k in f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (4, 8.0)  # the scale 2 travels along
    # the merged folder, loaded as megadmd trains (VSA gates, VSA processor), is the trained generator
    merged = load_wan(tmp_path / "merged")
    attach_vsa_gates(merged, tmp_path / "merged")
    configure_attention(merged, vsa=VSASettings(0.5, "torch"))
    g = torch.Generator().manual_seed(3)
    x, t, text = torch.randn(2, 4, 4, 16, 16, generator=g), torch.tensor([900.0, 400.0]), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        want = ref.models.generator.module(x, t, text, return_dict=False)[0]
        torch.testing.assert_close(merged(x, t, text, return_dict=False)[0], want, rtol=1e-5, atol=1e-5)
    # vanilla diffusers: the teacher + load_lora_weights samples what the merged transformer samples
    lora_pipe = _pipeline(tmp_path, load_wan(model))
    teacher_sample = _sample(lora_pipe)
    lora_pipe.load_lora_weights(str(tmp_path / "adapter"))
    adapted = _sample(lora_pipe)
    merged_sample = _sample(_pipeline(tmp_path, load_wan(tmp_path / "merged")))
    torch.testing.assert_close(adapted, merged_sample, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, teacher_sample, atol=1e-3)  # the adapter is not nothing
    # the adapter folder says which steps to sample on, as the merged export does
    from megadmd.pipeline.scheduler import DMDScheduler, use_dmd_scheduler

    steps = [use_dmd_scheduler(lora_pipe, tmp_path / m).config.timesteps for m in ("adapter", "merged")]
    assert steps[0] == steps[1] and len(steps[0]) == len(resolve().dmd.denoising_steps)
    lora_pipe.scheduler = DMDScheduler(timesteps=[1000, 757, 522])
    code, out = cli("export-ema", ckpt, "-o", tmp_path / "ema", "--lora", "adapter")
    assert code == 0, out
    lora_pipe.unload_lora_weights()
    lora_pipe.load_lora_weights(str(tmp_path / "ema"))
    assert not torch.allclose(_sample(lora_pipe), adapted, atol=1e-4)  # the EMA, not the live weights
    code, out = cli("convert", "to-diffusers", ckpt, "-o", tmp_path / "x", "--lora", "adapter", "--pipeline-from", model)
    assert code == 2 and "--pipeline-from writes a full pipeline; use it with --lora merged" in out
    assert not (tmp_path / "x").exists()


def test_two_experts_get_an_adapter_each_and_export_to_a_wan22_pipeline(tmp_path, single_process_world):
    from diffusers import WanPipeline

    from megadmd.lora.export import LORA_FILES
    from megadmd.pipeline.scheduler import DMDScheduler
    from tests.helpers import save_tiny_wan22_pipeline

    base = save_tiny_wan22_pipeline(tmp_path / "wan22")
    data = save_test_dataset(tmp_path / "data", num_samples=4)
    t = run_train(resolve(overrides=[
        f"output_dir={tmp_path / 'run'}", f"model.teacher_path={base}", f"data.path={data}", "model.boundary_ratio=0.875",
        "dmd.denoising_steps=[1000,500]", "train.max_steps=2", "dmd.generator_update_interval=1",
        "train.micro_batch_size=2", "checkpoint.interval_steps=0", *LORA]))
    assert {n.split(".")[0] for n, _ in t.models.generator.module.named_parameters()} == {"high", "low"}
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    code, out = cli("convert", "to-diffusers", ckpt, "-o", tmp_path / "adapter", "--lora", "adapter")
    assert code == 0, out
    code, out = cli("convert", "to-diffusers", ckpt, "-o", tmp_path / "merged", "--lora", "merged", "--pipeline-from", base)
    assert code == 0, out
    adapted = WanPipeline.from_pretrained(str(base))
    adapted.load_lora_weights(str(tmp_path / "adapter"))
    adapted.load_lora_weights(str(tmp_path / "adapter"), weight_name=LORA_FILES["transformer_2"],
                              load_into_transformer_2=True)
    merged = WanPipeline.from_pretrained(str(tmp_path / "merged"))
    results = []
    for pipe in (adapted, merged):
        pipe.scheduler = DMDScheduler(timesteps=[1000, 500])  # step 1000: the high-noise expert, 500: the low-noise one
        results.append(_sample(pipe, steps=2))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_a_non_finite_update_leaves_the_adapters_and_the_base_untouched(reference, monkeypatch):
    """The guard (train.nonfinite=skip) on adapter engines: a NaN teacher x0 drops the generator's
    update, a NaN gradient (DeepSpeed's own overflow skip) the fake score's; adapters and the shared
    base stay bit-identical, and the next clean update applies. Runs last: it moves the trainer on."""
    from megadmd.dmd import losses
    from megadmd.zero import full_state_dict

    trainer = reference[3]
    m, s = trainer.models, trainer.state

    def weights():
        return {r: full_state_dict(m.engine(r).module) for r in ("generator", "fake_score", "teacher")}

    def unchanged(a, b, role):
        return all(torch.equal(a[role][k], b[role][k]) for k in a[role])

    before = weights()
    monkeypatch.setattr(trainer, "teacher_x0", lambda x_t, t, batch: torch.full_like(x_t, float("nan")))
    trainer.generator_step([trainer.data.next()])
    monkeypatch.undo()
    assert s.generator_skipped == 1 and trainer.guard.found == ["teacher x0"]
    real = losses.fake_score_loss
    monkeypatch.setattr(losses, "fake_score_loss", lambda v, eps, x0: real(v, eps, x0) + (v - v.detach()).abs().sqrt().sum())
    trainer.fake_score_step([trainer.data.next()])
    monkeypatch.undo()
    assert s.fake_score_skipped == 1 and not m.fake_score.was_step_applied()
    after = weights()
    assert all(unchanged(before, after, r) for r in after)
    trainer.generator_step([trainer.data.next()])
    assert m.generator.was_step_applied() and s.generator_skipped == 1
    clean = weights()
    assert not unchanged(after, clean, "generator") and unchanged(after, clean, "teacher")
