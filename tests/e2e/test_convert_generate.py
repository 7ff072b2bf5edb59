"""From a checkpoint to something users ship: convert, export-ema, WanPipeline, generate."""
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import (TEST_LATENT_SHAPE, TEST_WAN_CONFIG, cli_env, save_test_dataset, save_test_model,
                           save_tiny_text_encoder, save_tiny_vae, save_tiny_wan_pipeline, spawn)

PROMPT = "a cat runs on the beach"
SAMPLE_ARGS = dict(prompt=PROMPT, height=128, width=128, num_frames=13, num_inference_steps=3, guidance_scale=1.0,
                   output_type="latent")  # latents 4x4x16x16: VSA_LATENT
VSA_LATENT = "4,4,16,16"  # a 4x8x8 token grid: 4 VSA cubes, so sparsity 0.5 selects 2 of 4


def megadmd(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "megadmd", *map(str, args)], env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


def cli(*args):
    """The CLI in this process (no interpreter start-up): click's runner, exit code and output."""
    from click.testing import CliRunner

    from megadmd.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@contextlib.contextmanager
def diffusers_log():
    """Every message diffusers logs inside the block."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.distributed.workers import train_save_and_probe

    root = tmp_path_factory.mktemp("convert")
    model = save_test_model(root / "teacher")
    data = save_test_dataset(root / "data", num_samples=8, latent_shape=[4, 4, 16, 16])  # a 4x8x8 grid: 4 VSA cubes
    overrides = [f"model.teacher_path={model}", f"data.path={data}", f"output_dir={root / 'run'}",
                 "train.max_steps=4", "dmd.generator_update_interval=2", "logging.tensorboard=false",
                 "ema.decay=0.5", "attention.vsa_sparsity=0.5", "attention.vsa_backend=torch",
                 "dmd.gan.enabled=true", "dmd.gan.hidden_dim=16", "optim.generator.lr=1e-2",
                 "dmd.warp_denoising_step=true"]
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
    """Each role's folder reproduces its training-time module; the generator's does so through
    `megadmd generate`'s loader with VSA and through `enable_vsa` on a plain diffusers load."""
    from diffusers import WanTransformer3DModel

    from megadmd.attention import enable_vsa
    from megadmd.generate import GenerateOptions, _load_generator, with_model_defaults

    _, probe, _ = trained
    for role in ("generator", "fake_score"):
        out = tmp_path / role
        r = megadmd("convert", "to-diffusers", probe["checkpoint"], "-o", out, "--role", role)
        assert r.returncode == 0, r.stderr[-2000:]
        plain, info = WanTransformer3DModel.from_pretrained(str(out), output_loading_info=True)
        assert not info["unexpected_keys"] and not info["missing_keys"], info  # no unused-weights warning
        assert plain.config.num_layers == TEST_WAN_CONFIG["num_layers"]
        models = [_load_like_training(out, vsa=role == "generator")]
        if role == "generator":
            o = with_model_defaults(GenerateOptions(model=str(out), out="-", latent_shape=(4, 4, 16, 16)))
            assert (o.attention, o.vsa_sparsity) == ("vsa", 0.5)  # from the run, via megadmd_sampling.json
            assert o.steps == probe["steps"]
            models.append(_load_generator(o, torch.float32, torch.device("cpu")))
            assert enable_vsa(plain) == TEST_WAN_CONFIG["num_layers"]
            models.append(plain.eval())
        for model in models:
            with torch.no_grad():
                got = model(probe["x"], probe["t"], probe["text"], return_dict=False)[0]
            assert torch.allclose(got, probe["outputs"][role], atol=1e-5), role
    from safetensors import safe_open

    with safe_open(str(tmp_path / "generator" / "vsa_gates.safetensors"), "pt") as f:
        assert f.keys() and all("to_gate_compress" in k for k in f.keys())  # the VSA gates, in their own file
    assert not (tmp_path / "fake_score" / "vsa_gates.safetensors").exists()
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


@pytest.fixture(scope="module")
def shipped(trained, tmp_path_factory):
    """The EMA exported as a complete pipeline from a tiny Wan pipeline (UniPC scheduler, as Wan
    ships), then copied elsewhere with the export and the base pipeline deleted."""
    _, probe, _ = trained
    root = tmp_path_factory.mktemp("shipped")
    base = save_tiny_wan_pipeline(root / "wan")
    r = cli("export-ema", probe["checkpoint"], "-o", root / "src" / "fastwan", "--pipeline-from", base)
    assert r.exit_code == 0, r.output
    assert not [p for p in (root / "src").rglob("*") if p.is_symlink()]  # copies, not links
    shutil.copytree(root / "src" / "fastwan", root / "moved" / "fastwan")
    for gone in (root / "src", base, root / ".wan-parts"):
        shutil.rmtree(gone)
    return root / "moved" / "fastwan"


def test_export_samples_like_generate_with_dmd_scheduler_and_round_trips(trained, shipped, tmp_path):
    """The reproducible path: use_dmd_scheduler pins the run's steps and pipe(generator=g) fixes
    every draw, as `megadmd generate` (its default --noise) draws them."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from safetensors.torch import load_file

    from megadmd.attention import enable_vsa
    from megadmd.pipeline import DMDScheduler, use_dmd_scheduler
    from megadmd.pipeline.info import SAMPLING_FILE

    _, probe, _ = trained
    with diffusers_log() as logs:
        pipe = WanPipeline.from_pretrained(str(shipped))
    assert not [m for m in logs if "were not used" in m], logs  # the gates are not in diffusers' weights
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler  # diffusers' own (loaded without megadmd below)
    info = json.loads((shipped / SAMPLING_FILE).read_text())
    assert info["scheduler"] == {"library": "diffusers", "class_name": "FlowMatchEulerDiscreteScheduler"}
    assert info["num_inference_steps"] == 3
    assert use_dmd_scheduler(pipe) is pipe.scheduler and isinstance(pipe.scheduler, DMDScheduler)
    pipe.scheduler.set_timesteps(3)
    assert pipe.scheduler.timesteps.tolist() == pytest.approx(probe["steps"]) and probe["steps"][1] > 900  # warped
    assert enable_vsa(pipe.transformer) == TEST_WAN_CONFIG["num_layers"]  # sparsity 0.5 from the export
    first = pipe(generator=torch.Generator().manual_seed(5), **SAMPLE_ARGS).frames
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(pipe(generator=torch.Generator().manual_seed(5), **SAMPLE_ARGS).frames, first)
    # megadmd generate, same folder and seed; its steps, attention and text encoder come from the export
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    r = cli("generate", "--model", shipped, "-o", tmp_path / "gen", "--prompts", tmp_path / "p.txt",
            "--latent-shape", VSA_LATENT, "--seed", 5)
    assert r.exit_code == 0, r.output
    assert "VSA at sparsity 0.5 attention" in r.output
    torch.testing.assert_close(load_file(str(tmp_path / "gen" / "latents.safetensors"))["latents"], first,
                               rtol=0, atol=1e-5)
    # save_pretrained -> from_pretrained: the same scheduler and the same samples
    pipe.save_pretrained(str(tmp_path / "resaved"))
    again = WanPipeline.from_pretrained(str(tmp_path / "resaved"))
    assert isinstance(again.scheduler, DMDScheduler) and again.scheduler.config.timesteps == probe["steps"]
    enable_vsa(again.transformer, sparsity=0.5)  # megadmd_sampling.json is not part of what diffusers saves
    assert torch.equal(again(generator=torch.Generator().manual_seed(5), **SAMPLE_ARGS).frames, first)


# Run in a fresh interpreter where importing megadmd fails: the export must load and sample with
# diffusers alone, reproducibly after torch.manual_seed, and survive save_pretrained.
DIFFUSERS_ALONE = """
import json, sys
sys.modules["megadmd"] = None  # any import of megadmd (or a submodule) now raises ImportError
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

folder, resaved, out, args = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
steps = json.load(open(folder + "/megadmd_sampling.json"))["num_inference_steps"]
pipe = WanPipeline.from_pretrained(folder)
assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
pipe.scheduler.set_timesteps(steps)
timesteps = pipe.scheduler.timesteps.tolist()

def sample(p):
    torch.manual_seed(5)  # the starting latent and every re-noise: no generator
    return p(num_inference_steps=steps, **args).frames

first = sample(pipe)
same = torch.equal(sample(pipe), first)
pipe.save_pretrained(resaved)
resaved_same = torch.equal(sample(WanPipeline.from_pretrained(resaved)), first)
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "megadmd" and sys.modules[m] is not None)
torch.save({"timesteps": timesteps, "first": first, "same": same, "resaved_same": resaved_same,
            "megadmd_modules": loaded}, out)
"""


def test_export_loads_and_samples_with_diffusers_alone_like_generate(trained, shipped, tmp_path):
    from safetensors.torch import load_file

    from megadmd.pipeline.stock import TOLERANCE

    _, probe, _ = trained
    env = cli_env()
    env.pop("PYTHONPATH")
    args = {k: v for k, v in SAMPLE_ARGS.items() if k != "num_inference_steps"}
    r = subprocess.run([sys.executable, "-c", DIFFUSERS_ALONE, str(shipped), str(tmp_path / "resaved"),
                        str(tmp_path / "out.pt"), json.dumps(args)], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    assert got["megadmd_modules"] == []
    assert got["timesteps"] == pytest.approx(probe["steps"], abs=TOLERANCE) and probe["steps"][1] > 900  # warped
    assert got["same"] and got["resaved_same"]  # bit-identical after the same torch.manual_seed
    # megadmd generate with diffusers' convention: dense attention, as diffusers alone runs it
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    r = cli("generate", "--model", shipped, "-o", tmp_path / "gen", "--prompts", tmp_path / "p.txt",
            "--latent-shape", VSA_LATENT, "--seed", 5, "--noise", "diffusers", "--attention", "dense")
    assert r.exit_code == 0, r.output
    torch.testing.assert_close(load_file(str(tmp_path / "gen" / "latents.safetensors"))["latents"], got["first"],
                               rtol=0, atol=1e-5)


def test_linked_export_uses_relative_links(trained, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    _, probe, _ = trained
    base = save_tiny_wan_pipeline(tmp_path / "a" / "models" / "wan")
    r = cli("convert", "to-diffusers", probe["checkpoint"], "-o", tmp_path / "a" / "out" / "fastwan",
            "--pipeline-from", base, "--link")
    assert r.exit_code == 0, r.output
    links = [p for p in (tmp_path / "a" / "out" / "fastwan").iterdir() if p.is_symlink()]
    assert sorted(p.name for p in links) == ["text_encoder", "tokenizer", "vae"]  # the scheduler is written
    assert all(not os.path.isabs(os.readlink(p)) for p in links)
    shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True)  # the tree moves as one: links still hold
    shutil.rmtree(tmp_path / "a")
    pipe = WanPipeline.from_pretrained(str(tmp_path / "b" / "out" / "fastwan"))
    assert pipe.vae is not None and type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler


def test_readme_diffusers_section_runs_against_an_export(shipped, tmp_path, monkeypatch):
    """The README's code blocks, as written and in order (the second continues the first), with
    only the folder and the video size swapped for the tiny export's."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("### Using the distilled model in diffusers", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 2 and not re.search(r"^(import|from) megadmd", blocks[0], re.M)  # diffusers alone
    code = "\n".join(blocks)
    for old, new, count in (('"fastwan-1.3b"', repr(str(shipped)), 1),
                            ("height=448, width=832, num_frames=61", "height=32, width=32, num_frames=5", 2)):
        assert code.count(old) == count, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["video"].shape == (5, 32, 32, 3)
    assert (tmp_path / "cat.mp4").stat().st_size > 0 and (tmp_path / "cat-vsa.mp4").stat().st_size > 0


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
    from megadmd.models import load_wan, predict_velocity
    from megadmd.pipeline.scheduler import draw_renoise, renoise_generators, start_noise
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
    start = start_noise(7 + 1, TEST_LATENT_SHAPE)  # sample 1 of seed 7
    gens = renoise_generators(start)
    with torch.no_grad():
        want = sample_generator(lambda x, t: predict_velocity(net, x, t, text, torch.float32), [1000, 757, 522],
                                start, lambda k: draw_renoise(gens, start.shape, "cpu"))
    torch.testing.assert_close(one[key][1:2], want, rtol=1e-5, atol=1e-5)
