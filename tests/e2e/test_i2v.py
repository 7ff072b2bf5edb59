"""Image-to-video distillation with a tiny Wan I2V model: both training modes, the exported
generator in WanImageToVideoPipeline, and datasets that do not fit the model."""
import subprocess
import sys

import pytest
import torch

from tests.helpers import (TEST_I2V_CONFIG, cli_env, save_test_images, save_test_model, save_tiny_clip,
                           save_tiny_text_encoder, save_tiny_vae)

PROMPTS = ["a cat runs on the beach", "a dog in snow", "red bird flies over the sea", "city at night"]


def megadmd(*args):
    return subprocess.run([sys.executable, "-m", "megadmd", *map(str, args)], env=cli_env(), capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    parts = {"encoder": save_tiny_text_encoder(root / "umt5"), "clip": save_tiny_clip(root / "clip"),
             "vae": save_tiny_vae(root / "vae"), "teacher": save_test_model(root / "teacher", config=TEST_I2V_CONFIG),
             "images": save_test_images(root / "images", len(PROMPTS)), "root": root}
    r = megadmd("encode-text", "--prompts", root / "prompts.txt", "-o", root / "text", "--text-encoder", parts["encoder"],
                "--max-len", "16", "--shard-size", "2")  # the default negative prompt: Wan's
    assert r.returncode == 0, r.stderr[-2000:]
    r = megadmd("encode-images", "--text-data", root / "text", "--images", parts["images"], "-o", root / "cond",
                "--image-encoder", parts["clip"], "--vae", parts["vae"], "--video-size", "5,32,32")
    assert r.returncode == 0, r.stderr[-2000:]
    r = megadmd("synth", "--teacher", parts["teacher"], "--text-data", root / "cond", "-o", root / "latents",
                "--latent-shape", "4,2,4,4", "--steps", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    return parts


def _train(parts, data, out, *extra):
    args = ["train", "-o", out, "--max-steps", "4", "--set", f"data.path={data}", "--set",
            f"model.teacher_path={parts['teacher']}", "--set", "dmd.generator_update_interval=2",
            "--set", "logging.interval_steps=4", "--set", "ema.decay=0.5", *extra]
    return megadmd(*args)


def test_encode_text_wrote_wans_negative_prompt_by_default(i2v):
    import json

    from safetensors import safe_open

    from megadmd.data.text import WAN_NEGATIVE_PROMPT

    text = i2v["root"] / "text"
    assert json.loads((text / "index.json").read_text())["extra"]["negative_prompt"] == WAN_NEGATIVE_PROMPT
    with safe_open(str(text / "negative.safetensors"), "pt") as f:
        assert f.metadata()["caption"] == WAN_NEGATIVE_PROMPT
    assert WAN_NEGATIVE_PROMPT.startswith("Bright tones, overexposed, static, blurred details, subtitles")


def test_image_conditions_are_stored_and_synth_keeps_them(i2v):
    from megadmd.data.format import LatentDataset

    ds = LatentDataset(i2v["root"] / "latents")
    s = ds.get(2)
    assert s["latents"].shape == (4, 2, 4, 4) and s["image_latents"].shape == (4, 2, 4, 4)
    assert s["image_embeds"].shape == (5, 16)  # 2 x 2 patches + the class token, CLIP width 16
    assert ds.info.image_condition == {"latent_shape": [4, 2, 4, 4], "embed_shape": [5, 16]}


def test_synthetic_mode_and_export_in_the_i2v_pipeline(i2v, tmp_path):
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

    from megadmd.data.image import condition_channels, encode_images
    from megadmd.models import load_wan, predict_velocity
    from megadmd.pipeline import DMDScheduler
    from megadmd.pipeline.scheduler import draw_renoise, renoise_generators
    from megadmd.sampling import sample_generator

    r = _train(i2v, i2v["root"] / "latents", tmp_path / "run", "--set", "dmd.gan.enabled=true",
               "--set", "dmd.gan.hidden_dim=16")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 4/4 | loss/generator" in r.stdout
    r = megadmd("export-ema", tmp_path / "run" / "checkpoints" / "step-00000004", "-o", tmp_path / "ema")
    assert r.returncode == 0, r.stderr[-2000:]
    pipe = WanImageToVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(str(i2v["encoder"])),
        text_encoder=UMT5EncoderModel.from_pretrained(str(i2v["encoder"])),
        image_encoder=CLIPVisionModel.from_pretrained(str(i2v["clip"])),
        image_processor=CLIPImageProcessor.from_pretrained(str(i2v["clip"])),
        vae=AutoencoderKLWan.from_pretrained(str(i2v["vae"])), transformer=load_wan(tmp_path / "ema"),
        scheduler=DMDScheduler(timesteps=[1000, 757, 522]))
    image = Image.open(i2v["images"].parent / "img0.png").convert("RGB").resize((32, 32))
    start = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    # the prompt's embedding as megadmd encodes it (diffusers' I2V prompt cleaning needs ftfy)
    from megadmd.data.loader import pad_text
    from megadmd.data.text import encode_prompts

    emb = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a cat runs"], 16, "cpu")[0]
    text = pad_text(emb, 512)[0].unsqueeze(0)
    lat, emb = encode_images([image], pipe.image_processor, pipe.image_encoder, pipe.vae, (5, 32, 32), "cpu")
    cond = {"condition": condition_channels(lat), "image_embeds": emb}

    def pipeline_and_ours():
        """The pipeline's 3-step sample and megadmd's sampler with the same image condition and noise."""
        out = pipe(image=image, prompt_embeds=text, height=32, width=32, num_frames=5, num_inference_steps=3,
                   guidance_scale=1.0, latents=start.clone(), output_type="latent").frames
        gens = renoise_generators(start)  # DMDScheduler's re-noise: seeded by the starting latent
        with torch.no_grad():
            ours = sample_generator(lambda x, t: predict_velocity(pipe.transformer, x, t, text, torch.float32, **cond),
                                    [1000, 757, 522], start, lambda i: draw_renoise(gens, start.shape, "cpu"))
        return out, ours

    out, ours = pipeline_and_ours()
    assert torch.allclose(out, ours, atol=1e-4)
    # `convert` writes the same kind of folder: every I2V weight present, loadable with no gaps
    from diffusers import WanTransformer3DModel

    r = megadmd("convert", "to-diffusers", tmp_path / "run" / "checkpoints" / "step-00000004", "-o", tmp_path / "conv")
    assert r.returncode == 0, r.stderr[-2000:]
    conv, info = WanTransformer3DModel.from_pretrained(str(tmp_path / "conv"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert conv.config.image_dim == pipe.transformer.config.image_dim is not None
    assert any(k.startswith("condition_embedder.image_embedder.") for k in conv.state_dict())
    # ... and it runs in the pipeline like the EMA export (the generator's own weights, so a
    # different sample from the EMA's at decay 0.5)
    pipe.transformer = conv.eval()
    out_conv, ours_conv = pipeline_and_ours()
    assert torch.allclose(out_conv, ours_conv, atol=1e-4) and torch.isfinite(out_conv).all()
    assert not torch.allclose(out_conv, out, atol=1e-4)


def test_data_free_mode_for_i2v(i2v, tmp_path):
    r = _train(i2v, i2v["root"] / "cond", tmp_path / "run", "--set", "dmd.simulate_generator_forward=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 4/4 | loss/generator" in r.stdout


def test_generate_i2v_from_the_conditioned_embeddings(i2v, tmp_path):
    r = megadmd("generate", "--model", i2v["teacher"], "-o", tmp_path / "g", "--embeds", i2v["root"] / "cond",
                "--latent-shape", "4,2,4,4", "--compare-teacher", i2v["teacher"], "--teacher-steps", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "speedup" in r.stdout and (tmp_path / "g" / "latents.safetensors").is_file()


def test_datasets_and_models_of_the_other_kind_are_refused(i2v, tmp_path):
    t2v = save_test_model(tmp_path / "t2v")
    r = megadmd("train", "-o", tmp_path / "a", "--set", f"data.path={i2v['root'] / 'latents'}",
                "--set", f"model.teacher_path={t2v}")
    assert r.returncode == 2 and "holds image conditions (image-to-video) but the model is text-to-video" in r.stderr
    from tests.helpers import save_test_dataset

    plain = save_test_dataset(tmp_path / "plain", num_samples=4)
    r = megadmd("train", "-o", tmp_path / "b", "--set", f"data.path={plain}", "--set",
                f"model.teacher_path={i2v['teacher']}")
    assert r.returncode == 2 and "is image-to-video" in r.stderr and "encode-images" in r.stderr
