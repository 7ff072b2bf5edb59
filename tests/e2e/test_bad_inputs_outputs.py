"""Bad output folders, run folders and resumes, as users give them: each case exits with status 2,
prints exactly one ``megadmd: error:`` line naming what to fix (no traceback), and leaves the
folder it points at byte-identical. (Config, data and NaN inputs: tests/e2e/test_bad_inputs.py.)

Every command runs in this process (click's CliRunner); all cases fail before any model loads."""
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import (TEST_LATENT_SHAPE, TEST_WAN_CONFIG, error_lines, invoke_cli, save_test_images,
                           save_tiny_text_encoder, tree_digest)

CKPT2, CKPT4 = "step-00000002", "step-00000004"
SHAPE = ",".join(map(str, TEST_LATENT_SHAPE))


@pytest.fixture(scope="module")
def env(trained_run, tmp_path_factory, test_model_dir, test_dataset_dir):
    """Folders to point commands at; cases never change them (that is what they check)."""
    from safetensors.torch import save_file

    from megadmd.data.make import write_random_dataset
    from megadmd.models import build_wan
    from megadmd.toy.builtin import write_toy_dataset

    root = tmp_path_factory.mktemp("bad-outputs")
    src, overrides = trained_run
    e = SimpleNamespace(root=root, model=test_model_dir, data=test_dataset_dir, overrides=overrides)
    e.run = root / "run"
    shutil.copytree(src, e.run)
    e.ckpt = e.run / "checkpoints" / CKPT4
    e.truncated = root / "truncated"  # every checkpoint cut short
    shutil.copytree(src, e.truncated)
    for name in (CKPT2, CKPT4):
        f = next((e.truncated / "checkpoints" / name).glob("generator/zero/*optim_states.pt"))
        f.write_bytes(f.read_bytes()[:100])
    e.flipped = root / "flipped"  # a checkpoint of the right size with other bytes
    shutil.copytree(src / "checkpoints" / CKPT4, e.flipped)
    f = next(e.flipped.glob("generator/zero/*optim_states.pt"))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x80
    f.write_bytes(bytes(data))
    e.user = root / "mine"
    e.user.mkdir()
    (e.user / "notes.txt").write_text("my notes\n")
    e.file = root / "a-file.txt"
    e.file.write_text("not a folder\n")
    e.dataset = root / "made"
    write_random_dataset(e.dataset, num_samples=4, latent_shape=list(TEST_LATENT_SHAPE), text_len=4, text_dim=32)
    e.text = root / "text"
    write_random_dataset(e.text, num_samples=4, latent_shape=None, text_len=4, text_dim=32)
    e.toy = root / "toy"
    write_toy_dataset(e.toy, 8)
    e.runs = root / "runs"  # a folder holding a run two levels down
    shutil.copytree(src, e.runs / "2026" / "run")
    e.weights_dir = root / "weights"
    e.weights_dir.mkdir()
    e.weights = e.weights_dir / "w.safetensors"
    save_file({k: v.contiguous() for k, v in build_wan(TEST_WAN_CONFIG, seed=2).state_dict().items()}, str(e.weights))
    e.images = save_test_images(root / "images", 4)
    e.prompts = root / "prompts.txt"
    e.prompts.write_text("a cat runs\na dog in snow\n")
    e.encoder = save_tiny_text_encoder(root / "umt5")
    e.encoded = root / "encoded"
    r = invoke_cli("encode-text", "--prompts", e.prompts, "-o", e.encoded, "--text-encoder", e.encoder, "--max-len", "16")
    assert r.exit_code == 0, r.output + r.stderr
    e.toy_run = root / "toy-run"  # an output_dir whose data/ holds a user's file
    (e.toy_run / "data").mkdir(parents=True)
    (e.toy_run / "data" / "notes.txt").write_text("mine\n")
    return e


def _train(e, run, *extra):
    args = ["train"]
    for o in [f"output_dir={run}", *e.overrides]:
        args += ["--set", o]
    return [*args, *extra]


def _gen(e, out, *flags):
    return ["generate", "--model", e.model, "--embeds", e.data, "--latent-shape", SHAPE, "-o", out, *flags]


def _make(out, *flags):
    return ["make-dataset", "-o", out, "-n", "2", "--latent-shape", SHAPE, "--text-len", "4", "--text-dim", "32", *flags]


def _init(e, out, *flags):
    return ["convert", "init", e.weights, "--config", e.model, "-o", out, *flags]


def _synth(e, out, *flags):
    return ["synth", "--teacher", e.model, "--text-data", e.text, "--latent-shape", SHAPE, "-o", out, *flags]


def _encode(e, out, *flags):
    return ["encode-text", "--prompts", e.prompts, "--text-encoder", e.encoder, "-o", out, *flags]


def _images(e, out, *flags):
    return ["encode-images", "--text-data", e.text, "--images", e.images, "--image-encoder", e.root / "no-clip",
            "--vae", e.root / "no-vae", "--video-size", "5,32,32", "-o", out, *flags]


# (case id, lambda env: (command line, the folder that must stay byte-identical), words of the error line)
CASES = [
    ("to-diffusers onto a run", lambda e: (["convert", "to-diffusers", e.ckpt, "-o", e.run], e.run),
     ["is a megadmd training run", "never deletes"]),
    ("to-diffusers onto a run, --overwrite",
     lambda e: (["convert", "to-diffusers", e.ckpt, "-o", e.run, "--overwrite"], e.run), ["is a megadmd training run"]),
    ("to-diffusers onto a user folder", lambda e: (["convert", "to-diffusers", e.ckpt, "-o", e.user], e.user),
     ["is not empty (notes.txt)", "pass --overwrite"]),
    ("to-diffusers onto a file", lambda e: (["convert", "to-diffusers", e.ckpt, "-o", e.file], e.file),
     ["a-file.txt is a file, not a folder"]),
    ("to-diffusers into an unwritable place",
     lambda e: (["convert", "to-diffusers", e.ckpt, "-o", "/proc/megadmd-out"], Path("/proc/megadmd-out")), ["cannot write in /proc"]),
    ("to-diffusers onto its own checkpoint, --overwrite",
     lambda e: (["convert", "to-diffusers", e.ckpt, "-o", e.ckpt, "--overwrite"], e.run),
     [f"{CKPT4} is a megadmd checkpoint", "never deletes"]),
    ("to-diffusers into its own checkpoint",
     lambda e: (["convert", "to-diffusers", e.ckpt, "-o", e.ckpt / "export"], e.run), ["overlaps the input"]),
    ("to-diffusers of a checkpoint with flipped bits",
     lambda e: (["convert", "to-diffusers", e.flipped, "-o", e.root / "never"], e.root / "never"),
     ["flipped/generator/zero/", "does not match its content hash"]),
    ("export-ema onto a user folder", lambda e: (["export-ema", e.ckpt, "-o", e.user], e.user), ["is not empty"]),
    ("export-ema onto a run, --overwrite", lambda e: (["export-ema", e.ckpt, "-o", e.run, "--overwrite"], e.run),
     ["is a megadmd training run"]),
    ("export-ema onto a dataset, --overwrite",
     lambda e: (["export-ema", e.ckpt, "-o", e.dataset, "--overwrite"], e.dataset),
     ["is a megadmd dataset written by 'megadmd make-dataset'", "never deletes"]),
    ("convert init onto a user folder", lambda e: (_init(e, e.user), e.user), ["is not empty", "--overwrite"]),
    ("convert init onto the folder of its weights, --overwrite",
     lambda e: (_init(e, e.weights_dir, "--overwrite"), e.weights_dir), ["overlaps the input", "w.safetensors"]),
    ("convert init onto a file", lambda e: (_init(e, e.file), e.file), ["is a file, not a folder"]),
    ("make-dataset onto its earlier dataset", lambda e: (_make(e.dataset), e.dataset),
     ["is a megadmd dataset written by 'megadmd make-dataset'", "pass --overwrite"]),
    ("make-dataset onto a run's toy data, --overwrite", lambda e: (_make(e.toy, "--overwrite"), e.toy),
     ["written by 'megadmd train'", "never deletes"]),
    ("make-dataset onto a folder holding a run, --overwrite", lambda e: (_make(e.runs, "--overwrite"), e.runs),
     ["2026/run is a megadmd training run"]),
    ("make-dataset onto a file", lambda e: (_make(e.file), e.file), ["is a file, not a folder"]),
    ("generate onto a user folder", lambda e: (_gen(e, e.user), e.user), ["is not empty", "--overwrite"]),
    ("generate onto a run, --overwrite", lambda e: (_gen(e, e.run, "--overwrite"), e.run),
     ["is a megadmd training run"]),
    ("encode-text onto a run", lambda e: (_encode(e, e.run), e.run), ["is a megadmd training run"]),
    ("encode-text onto another command's dataset, --overwrite",
     lambda e: (_encode(e, e.dataset, "--overwrite"), e.dataset), ["written by 'megadmd make-dataset'"]),
    ("encode-text onto its output made with other settings",
     lambda e: (_encode(e, e.encoded, "--max-len", "8"), e.encoded),
     ["made with other settings (max_len 16 -> 8)", "pass the same options to continue it"]),
    ("synth onto its own input, --overwrite", lambda e: (_synth(e, e.text, "--overwrite"), e.text),
     ["is a megadmd dataset written by 'megadmd make-dataset'", "never deletes"]),
    ("synth onto a user folder", lambda e: (_synth(e, e.user), e.user), ["is not empty"]),
    ("encode-images onto a run", lambda e: (_images(e, e.run), e.run), ["is a megadmd training run"]),
    ("train into a file", lambda e: (["train", "-o", e.file], e.file), ["output_dir", "is a file, not a folder"]),
    ("train into an unwritable place", lambda e: (["train", "-o", "/proc/megadmd-run"], Path("/proc/megadmd-run")),
     ["output_dir /proc/megadmd-run: cannot write in /proc"]),
    ("train into a user folder", lambda e: (["train", "-o", e.user], e.user),
     ["is not empty (notes.txt) and is not a megadmd run", "--overwrite"]),
    ("train with toy data over a user's data/, --overwrite",
     lambda e: (["train", "-o", e.toy_run, "--overwrite"], e.toy_run),
     ["toy-run/data holds notes.txt", "toy dataset is written there", "data.path"]),
    ("train into a checkpoint folder", lambda e: (_train(e, e.ckpt), e.run),
     [f"{CKPT4} is a megadmd checkpoint, not a run folder"]),
    ("train again without --resume", lambda e: (_train(e, e.run), e.run),
     [f"already holds checkpoints (the newest: {CKPT4})", "--resume auto"]),
    ("resume auto with every checkpoint truncated", lambda e: (_train(e, e.truncated, "--resume", "auto"), e.truncated),
     ["no intact checkpoint", "has 100 bytes", "refusing to start the run over"]),
    ("resume of a truncated checkpoint",
     lambda e: (_train(e, e.truncated, "--resume", e.truncated / "checkpoints" / CKPT4), e.truncated),
     ["checkpoint.resume: checkpoint", "has 100 bytes"]),
    ("resume of a missing checkpoint", lambda e: (_train(e, e.run, "--resume", e.root / "nowhere"), e.run),
     ["no checkpoint folder at"]),
    ("resume of an older checkpoint of the same run",
     lambda e: (_train(e, e.run, "--resume", e.run / "checkpoints" / CKPT2, "--max-steps", "6"), e.run),
     [f"is older than {CKPT4} of the same run", "--resume auto"]),
    ("resume with max_steps below the checkpoint", lambda e: (_train(e, e.run, "--resume", "auto", "--max-steps", "3"),
                                                               e.run),
     [f"train.max_steps=3 is below the step of the checkpoint to resume ({CKPT4} is at step 4)"]),
    ("resume with another step list",
     lambda e: (_train(e, e.run, "--resume", "auto", "--set", "dmd.denoising_steps=[1000,500]"), e.run),
     ["changes the optimisation: dmd.denoising_steps", "--allow-config-change"]),
    ("resume with another flow shift",
     lambda e: (_train(e, e.run, "--resume", "auto", "--set", "dmd.flow_shift=5.0"), e.run), ["dmd.flow_shift"]),
    ("resume with another global batch",
     lambda e: (_train(e, e.run, "--resume", "auto", "--set", "train.grad_accum_steps=2"), e.run),
     ["global batch (dp x train.micro_batch_size x train.grad_accum_steps) 2 -> 4"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_output_is_one_line_and_changes_nothing(env, case):
    _, make, words = case
    args, folder = make(env)
    before = tree_digest(folder)
    r = invoke_cli(*args)
    lines = error_lines(r)
    assert r.exit_code == 2, (r.exit_code, r.output, r.stderr, r.exception)
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr + r.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert tree_digest(folder) == before
