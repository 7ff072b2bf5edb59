"""From a checkpoint to something users ship: convert, export-ema, WanPipeline, generate."""
import subprocess
import sys

import pytest
import torch

from tests.helpers import (TEST_LATENT_SHAPE, TEST_WAN_CONFIG, cli_env, save_test_dataset, save_test_model,
                           save_tiny_text_encoder, save_tiny_vae, spawn)


def megadmd(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "megadmd", *map(str, args)], env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.distributed.workers import train_save_and_probe

    root = tmp_path_factory.mktemp("convert")
    model = save_test_model(root / "teacher")
    data = save_test_dataset(root / "data", num_samples=8, latent_shape=[4, 4, 16, 16])  # a 4x8x8 grid: 4 VSA cubes
    overrides = [f"model.teacher_path={model}", f"data.path={data}", f"output_dir={root / 'run'}",
                 "train.max_steps=4", "dmd.generator_update_interval=2", "logging.tensorboard=false",
                 "ema.decay=0.5", "attention.vsa_sparsity=0.5", "attention.vsa_backend=torch",
                 "dmd.gan.enabled=true", "dmd.gan.hidden_dim=16", "optim.generator.lr=1e-2"]
    spawn(train_save_and_probe, 2, overrides, str(root / "probe.pt"))
    return root, torch.load(root / "probe.pt", weights_only=False), model


def _load_like_training(folder, vsa: bool):
    from megadmd.attention.processor import VSASettings, configure_attention
    from megadmd.models import attach_vsa_gates, load_wan

    m = load_wan(folder)
    if vsa:
        attach_vsa_gates(m, folder)
    configure_attention(m, vsa=VSASettings(0.5, "torch") if vsa else None)
    return m.eval()


def test_converted_roles_load_in_diffusers_and_match_the_engine_modules(trained, tmp_path):
    from diffusers import WanTransformer3DModel

    _, probe, _ = trained
    for role in ("generator", "fake_score"):
        out = tmp_path / role
        r = megadmd("convert", "to-diffusers", probe["checkpoint"], "-o", out, "--role", role)
        assert r.returncode == 0, r.stderr[-2000:]
        plain = WanTransformer3DModel.from_pretrained(str(out))  # vanilla diffusers loads it
        assert plain.config.num_layers == TEST_WAN_CONFIG["num_layers"]
        model = _load_like_training(out, vsa=role == "generator")
        with torch.no_grad():
            got = model(probe["x"], probe["t"], probe["text"], return_dict=False)[0]
        assert torch.allclose(got, probe["outputs"][role], atol=1e-5), role
    from safetensors import safe_open

    with safe_open(str(tmp_path / "generator" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert any("to_gate_compress" in k for k in f.keys())  # the VSA gates are kept
    with safe_open(str(tmp_path / "fake_score" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert not any(k.startswith("gan_head.") for k in f.keys())  # the GAN head is not a Wan weight


def test_sharded_output_above_the_size_limit(trained, tmp_path):
    from diffusers import WanTransformer3DModel

    _, probe, _ = trained
    r = megadmd("convert", "to-diffusers", probe["checkpoint"], "-o", tmp_path / "sharded", "--max-shard-size", "20KB")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    WanTransformer3DModel.from_pretrained(str(tmp_path / "sharded"))


def test_exported_ema_runs_in_wan_pipeline_on_the_three_step_schedule(trained, tmp_path):
    from diffusers import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    from megadmd.models import load_wan, predict_velocity
    from megadmd.sampling import dmd_scheduler, sample_generator

    _, probe, _ = trained
    r = megadmd("export-ema", probe["checkpoint"], "-o", tmp_path / "ema")
    assert r.returncode == 0, r.stderr[-2000:]
    enc = save_tiny_text_encoder(tmp_path / "umt5")
    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(str(enc)),
                       text_encoder=UMT5EncoderModel.from_pretrained(str(enc)),
                       vae=__import__("diffusers").AutoencoderKLWan.from_pretrained(str(save_tiny_vae(tmp_path / "vae"))),
                       transformer=load_wan(tmp_path / "ema"), scheduler=dmd_scheduler([1000, 757, 522]))
    g = torch.Generator().manual_seed(0)
    start = torch.randn(1, 4, 2, 4, 4, generator=g)
    torch.manual_seed(7)  # WanPipeline's scheduler.step draws its re-noising from the global generator
    out = pipe(prompt="a cat runs on the beach", height=32, width=32, num_frames=5, num_inference_steps=3,
               guidance_scale=1.0, latents=start.clone(), output_type="latent", max_sequence_length=16)
    video = pipe(prompt="a cat runs on the beach", height=32, width=32, num_frames=5, num_inference_steps=3,
                 guidance_scale=1.0, latents=start.clone(), max_sequence_length=16).frames
    assert video.shape[1:] == (5, 32, 32, 3)
    # the same three DMD steps through megadmd's sampler, with the same noise draws
    text, _ = pipe.encode_prompt("a cat runs on the beach", do_classifier_free_guidance=False, max_sequence_length=16)
    gen = torch.Generator().manual_seed(7)
    vfn = lambda x, t: predict_velocity(pipe.transformer, x, t, text, torch.float32)  # noqa: E731
    with torch.no_grad():
        ours = sample_generator(vfn, [1000, 757, 522], start, lambda i: torch.randn(start.shape, generator=gen))
    assert torch.allclose(out.frames, ours, atol=1e-4)


def test_generate_with_prompts_vae_and_teacher_timing(trained, tmp_path):
    root, probe, teacher = trained
    r = megadmd("convert", "to-diffusers", probe["checkpoint"], "-o", tmp_path / "gen")
    assert r.returncode == 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat runs\nred bird over the sea\n")
    r = megadmd("generate", "--model", tmp_path / "gen", "-o", tmp_path / "out", "--prompts", prompts,
                "--text-encoder", save_tiny_text_encoder(tmp_path / "umt5"), "--latent-shape", "4,2,4,4",
                "--vae", save_tiny_vae(tmp_path / "vae"), "--compare-teacher", teacher, "--teacher-steps", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "student, 3 steps:" in r.stdout and "teacher, 10 steps + CFG:" in r.stdout and "speedup:" in r.stdout
    for name in ("latents.safetensors", "sample_0000.mp4", "sample_0001.mp4", "grid.png", "timing.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name


def _to_original_names(state: dict) -> dict:
    """diffusers -> original Wan key names (the inverse of diffusers' single-file mapping, for the
    keys of this architecture)."""
    pairs = [("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
             ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
             ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
             ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
             ("condition_embedder.time_proj", "time_projection.1"), ("attn2", "cross_attn"), ("attn1", "self_attn"),
             (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
             ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("proj_out", "head.head"), ("norm2", "norm3")]
    out = {}
    for k, v in state.items():
        new = "head.modulation" if k == "scale_shift_table" else k.replace("scale_shift_table", "modulation")
        for a, b in pairs:
            new = new.replace(a, b)
        out[new] = v
    return out


def test_init_from_plain_weights_in_either_naming(tmp_path):
    from safetensors.torch import save_file

    from megadmd.models import build_wan, load_wan

    ref = build_wan(TEST_WAN_CONFIG, seed=9)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    (tmp_path / "config.json").write_text(__import__("json").dumps(ref.config))
    save_file(state, str(tmp_path / "diffusers.safetensors"))
    save_file(_to_original_names(state), str(tmp_path / "original.safetensors"))
    for name in ("diffusers", "original"):
        r = megadmd("convert", "init", tmp_path / f"{name}.safetensors", "--config", tmp_path / "config.json",
                    "-o", tmp_path / f"init_{name}")
        assert r.returncode == 0, r.stderr[-2000:]
        got = load_wan(tmp_path / f"init_{name}").state_dict()
        assert all(torch.equal(got[k], v) for k, v in state.items()), name
    bad = {k: v for k, v in state.items() if not k.startswith("proj_out")}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    r = megadmd("convert", "init", tmp_path / "bad.safetensors", "--config", tmp_path / "config.json", "-o", tmp_path / "x")
    assert r.returncode == 2 and "keys missing" in r.stderr and not (tmp_path / "x").exists()


def test_generate_pads_text_like_training_so_samples_do_not_depend_on_the_batch(tmp_path):
    """Wan has no text mask, so zero padding is part of the condition: `generate` pads every
    embedding to the dataset's max_text_len (what training feeds), and a sample's latents are the
    same whatever batch it is drawn in. Checked against the 3-step sampler run by hand."""
    from safetensors.torch import load_file

    from megadmd.data.format import LatentDataset
    from megadmd.data.loader import pad_text
    from megadmd.generate import PURPOSE_RENOISE, PURPOSE_START, _noise
    from megadmd.models import load_wan, predict_velocity
    from megadmd.sampling import sample_generator

    model, data = save_test_model(tmp_path / "m"), save_test_dataset(tmp_path / "d", num_samples=3, seed=4)
    ds = LatentDataset(data)
    lens = [ds.get(i)["text_len"] for i in range(3)]
    assert len(set(lens)) > 1 and min(lens) < ds.info.max_text_len  # padding matters here
    shape = ",".join(map(str, TEST_LATENT_SHAPE))
    for b in (1, 3):
        r = megadmd("generate", "--model", model, "--embeds", data, "--latent-shape", shape, "--batch-size", b,
                    "--seed", 7, "-o", tmp_path / f"b{b}")
        assert r.returncode == 0, r.stderr[-2000:]
    one, three = (load_file(str(tmp_path / f"b{b}" / "latents.safetensors")) for b in (1, 3))
    key = next(iter(one))
    torch.testing.assert_close(one[key], three[key], rtol=1e-5, atol=1e-5)
    s = ds.get(1)
    text = pad_text(s["text_embeds"][: s["text_len"]], ds.info.max_text_len)[0].unsqueeze(0)
    net = load_wan(model)
    with torch.no_grad():
        want = sample_generator(
            lambda x, t: predict_velocity(net, x, t, text, torch.float32), [1000, 757, 522],
            _noise(7, 1, PURPOSE_START, TEST_LATENT_SHAPE, "cpu").unsqueeze(0),
            lambda k: _noise(7, 1, PURPOSE_RENOISE, TEST_LATENT_SHAPE, "cpu", sub=k).unsqueeze(0))
    torch.testing.assert_close(one[key][1:2], want, rtol=1e-5, atol=1e-5)
