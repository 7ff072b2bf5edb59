"""encode-text -> synth -> train, data-free training, synth resume, previews, and bad input."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import TEST_LATENT_SHAPE, cli_env, save_test_model, save_tiny_text_encoder, save_tiny_vae

PROMPTS = ["a cat runs on the beach", "a dog in snow", "red bird flies over the sea", "city at night",
           "slow motion video of a cat", "close up of a blue bird", "a dog runs", "the sea at night"]


def megadmd(*args, timeout=600):
    r = subprocess.run([sys.executable, "-m", "megadmd", *map(str, args)], env=cli_env(), capture_output=True,
                       text=True, timeout=timeout)
    return r


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    return {"root": root, "prompts": prompts, "encoder": save_tiny_text_encoder(root / "umt5"),
            "teacher": save_test_model(root / "teacher"), "vae": save_tiny_vae(root / "vae")}


@pytest.fixture(scope="module")
def text_data(assets):
    out = assets["root"] / "text"
    r = megadmd("encode-text", "--prompts", assets["prompts"], "-o", out, "--text-encoder", assets["encoder"],
                "--negative-prompt", "blurry static", "--max-len", "16", "--shard-size", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_encode_text_writes_a_text_only_dataset(text_data):
    from megadmd.data.format import LatentDataset

    ds = LatentDataset(text_data)
    assert len(ds) == 8 and not ds.info.has_latents and len(ds.info.shards) == 3
    s = ds.get(1)
    assert s["caption"] == "a dog in snow" and s["text_len"] == 4  # 4 words, word-level tokenizer
    neg, caption = ds.negative()
    assert caption == "blurry static" and neg.shape == (2, 32)


def test_synth_then_train_end_to_end_with_previews(assets, text_data, tmp_path):
    out = tmp_path / "latents"
    r = megadmd("synth", "--teacher", assets["teacher"], "--text-data", text_data, "-o", out,
                "--latent-shape", ",".join(map(str, TEST_LATENT_SHAPE)), "--steps", "4",
                "--vae", assets["vae"], "--decode", "2", "--save-noise")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "synth: 8/8 samples (100%)" in r.stdout  # progress: plain lines when not on a terminal
    import torch

    from megadmd import flow
    from megadmd.data.format import LatentDataset
    from megadmd.data.synth import ode_sample
    from megadmd.models import load_wan

    ds = LatentDataset(out)
    assert ds.info.has_latents and len(ds) == 8 and ds.get(7)["caption"] == PROMPTS[7]
    for name in ("sample_00000.mp4", "sample_00000.png", "sample_00001.mp4"):
        assert (out / "previews" / name).stat().st_size > 0
    # --save-noise: each latent is the teacher's 4-step ODE (CFG 5, standard form) from its stored noise
    assert ds.info.has_noise
    src = LatentDataset(text_data)
    s, neg, width = ds.get(2), src.negative()[0], src.info.max_text_len
    text = torch.zeros(1, width, 32)
    text[0, : s["text_len"]] = s["text_embeds"][: s["text_len"]]
    uncond = torch.zeros(1, width, 32)
    uncond[0, : neg.shape[0]] = neg[:width]
    again = ode_sample(load_wan(assets["teacher"]).eval(), s["noise"][None], text, uncond, flow.euler_sigmas(4, 3.0),
                       5.0, "standard", torch.float32)
    assert torch.allclose(again[0], s["latents"], atol=1e-5)
    # trained with the regression on those pairs (and without it, the same dataset trains as before)
    r = megadmd("train", "-o", tmp_path / "run", "--max-steps", "5", "--set", f"data.path={out}",
                "--set", f"model.teacher_path={assets['teacher']}", "--set", "logging.interval_steps=5",
                "--set", "dmd.regression.weight=1.0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 5/5 | loss/generator" in r.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert acc.Scalars("loss/generator_regression")[0].value > 0


def test_data_free_training_runs_on_text_only_data(assets, text_data, tmp_path):
    r = megadmd("train", "-o", tmp_path / "run", "--max-steps", "5", "--set", f"data.path={text_data}",
                "--set", f"model.teacher_path={assets['teacher']}", "--set", "dmd.simulate_generator_forward=true",
                "--set", f"data.latent_shape={TEST_LATENT_SHAPE}".replace(" ", ""),
                "--set", "logging.interval_steps=5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 5/5 | loss/generator" in r.stdout


def test_synth_killed_midway_resumes_to_the_identical_dataset(assets, tmp_path):
    prompts = tmp_path / "many.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{PROMPTS[i % 8]} {i}"}}\n' for i in range(24)))
    text = tmp_path / "text"
    r = megadmd("encode-text", "--prompts", prompts, "-o", text, "--text-encoder", assets["encoder"],
                "--max-len", "16", "--shard-size", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    args = ["synth", "--teacher", assets["teacher"], "--text-data", text, "--latent-shape",
            ",".join(map(str, TEST_LATENT_SHAPE)), "--steps", "60", "--batch-size", "1"]
    whole = tmp_path / "whole"
    assert megadmd(*args, "-o", whole).returncode == 0
    part = tmp_path / "part"
    p = subprocess.Popen([sys.executable, "-m", "megadmd", *map(str, args), "-o", str(part)], env=cli_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (part / "shard-000002.safetensors").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (part / "index.json").exists()  # really interrupted
    assert megadmd(*args, "-o", part).returncode == 0
    names = sorted(f.name for f in whole.iterdir() if not f.name.startswith("."))  # hidden: temporary files
    assert names == sorted(f.name for f in part.iterdir() if not f.name.startswith("."))
    for name in [*names, ".megadmd-job.json"]:  # the job file: what the resumed run checked it continues
        assert (whole / name).read_bytes() == (part / name).read_bytes(), name


def test_bad_inputs_fail_clearly(assets, text_data, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    r = megadmd("encode-text", "--prompts", empty, "-o", tmp_path / "x", "--text-encoder", assets["encoder"])
    assert r.returncode == 2 and "holds no prompts" in r.stderr and not (tmp_path / "x").exists()
    no_tok = tmp_path / "enc_only"
    no_tok.mkdir()
    (no_tok / "config.json").write_bytes((assets["encoder"] / "config.json").read_bytes())
    r = megadmd("encode-text", "--prompts", assets["prompts"], "-o", tmp_path / "y", "--text-encoder", no_tok)
    assert r.returncode == 2 and "no tokenizer found" in r.stderr
    wide = save_test_model(tmp_path / "wide", config=dict(__import__("tests.helpers").helpers.TEST_WAN_CONFIG,
                                                           text_dim=64))
    r = megadmd("synth", "--teacher", wide, "--text-data", text_data, "-o", tmp_path / "z",
                "--latent-shape", "4,2,4,4")
    assert r.returncode == 2 and "dimension 32 but the teacher's text_dim is 64" in r.stderr
    r = megadmd("train", "-o", tmp_path / "t", "--set", f"data.path={text_data}", "--set",
                f"model.teacher_path={wide}", "--set", "dmd.simulate_generator_forward=true",
                "--set", "data.latent_shape=[4,2,4,4]")
    assert r.returncode == 2 and "text embeddings of dimension 32 but the model's text_dim is 64" in r.stderr


def _same_folder(a, b):
    names = sorted(f.name for f in a.iterdir() if not f.name.startswith("."))
    assert names == sorted(f.name for f in b.iterdir() if not f.name.startswith(".")) and names
    for name in names:
        if (a / name).is_file():
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_encode_text_and_synth_on_two_ranks_write_the_one_rank_datasets(assets, text_data, tmp_path):
    """Both commands split their shards across ranks (shard k on rank k % world); the result is
    byte-identical to the one-rank run. encode-text also resumes: a deleted shard is re-encoded
    and nothing else is touched."""
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
           "-m", "megadmd"]
    r = subprocess.run([*two, "encode-text", "--prompts", str(assets["prompts"]), "-o", str(tmp_path / "text2"),
                        "--text-encoder", str(assets["encoder"]), "--negative-prompt", "blurry static",
                        "--max-len", "16", "--shard-size", "3"], env=cli_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    _same_folder(text_data, tmp_path / "text2")

    shard = sorted(p for p in (tmp_path / "text2").iterdir() if p.name.startswith("shard"))[1]
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "text2").iterdir() if p != shard}
    shard.unlink()
    r = megadmd("encode-text", "--prompts", assets["prompts"], "-o", tmp_path / "text2", "--text-encoder",
                assets["encoder"], "--negative-prompt", "blurry static", "--max-len", "16", "--shard-size", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    _same_folder(text_data, tmp_path / "text2")
    assert all((tmp_path / "text2" / n).stat().st_mtime_ns == t for n, t in kept.items()
               if n.startswith("shard"))  # only the missing shard was written again

    synth = ["synth", "--teacher", str(assets["teacher"]), "--text-data", str(text_data),
             "--latent-shape", ",".join(map(str, TEST_LATENT_SHAPE)), "--steps", "3"]
    assert megadmd(*synth, "-o", tmp_path / "lat1").returncode == 0
    r = subprocess.run([*two, *synth, "-o", str(tmp_path / "lat2")], env=cli_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    _same_folder(tmp_path / "lat1", tmp_path / "lat2")


def test_synth_conditions_the_teacher_independently_of_the_shard_layout(assets, text_data, tmp_path):
    """Shards store text padded to their own longest prompt; the teacher must still see every
    prompt padded to the dataset's max_text_len, as in training (Wan has no text mask). So the
    same prompts give the same latents whatever shard size encode-text used."""
    from megadmd.data.format import LatentDataset

    r = megadmd("encode-text", "--prompts", assets["prompts"], "-o", tmp_path / "one_shard", "--text-encoder",
                assets["encoder"], "--negative-prompt", "blurry static", "--max-len", "16", "--shard-size", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    synth = ["synth", "--teacher", assets["teacher"], "--latent-shape", ",".join(map(str, TEST_LATENT_SHAPE)),
             "--steps", "3"]
    for name, src in (("a", text_data), ("b", tmp_path / "one_shard")):
        assert megadmd(*synth, "--text-data", src, "-o", tmp_path / name).returncode == 0
    a, b = LatentDataset(tmp_path / "a"), LatentDataset(tmp_path / "b")
    assert len(a.info.shards) == 3 and len(b.info.shards) == 1
    for i in range(len(PROMPTS)):
        assert a.get(i)["caption"] == b.get(i)["caption"]
        assert (a.get(i)["latents"] - b.get(i)["latents"]).abs().max() < 1e-5, i
