"""Bad input, table-driven, through the CLI in-process: config values (NaN, infinity, ranges,
types), damaged or mismatched datasets, damaged teacher weights, non-UTF-8 files, generate's
shapes and step lists. Each case must give exit status 2, exactly one ``megadmd: error:`` line
naming what to fix, no traceback, and leave the output folder as it was (absent stays absent,
an existing one byte-identical)."""
import hashlib
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from megadmd.cli import main
from tests.helpers import DATASET_DAMAGE, save_test_dataset


def _truncate(f: Path, drop: int) -> None:
    f.write_bytes(f.read_bytes()[:-drop])


def _overwrite_header(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[8:24] = b"\x00not a header!!\x00"
    f.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, test_model_dir):
    root = tmp_path_factory.mktemp("bad")
    clean = save_test_dataset(root / "clean", num_samples=16)
    damaged = {}
    for i, (how, (damage, _)) in enumerate(sorted(DATASET_DAMAGE.items())):
        damaged[how] = shutil.copytree(clean, root / f"damaged-{i}")
        damage(damaged[how])
    weights = next(test_model_dir.glob("*.safetensors")).name
    truncated_model = shutil.copytree(test_model_dir, root / "truncated-model")
    _truncate(truncated_model / weights, 1000)
    overwritten_model = shutil.copytree(test_model_dir, root / "overwritten-model")
    _overwrite_header(overwritten_model / weights)
    files = {"latin1.yaml": b"dmd:\n  cfg_form: standard # caf\xe9\n", "latin1.json": b'{"preset": "tiny\xe9"}',
             "nan.yaml": b"dmd:\n  guidance_scale: .nan\n", "prompts.txt": b"a cat\na caf\xe9 by the sea\n",
             "images.txt": b"caf\xe9.png\n", "images.jsonl": b'{"path": "a.png"}\n'}
    for name, data in files.items():
        (root / name).write_bytes(data)
    existing = root / "existing-run"
    existing.mkdir()
    (existing / "notes.txt").write_text("the user's own file\n")
    return dict(root=root, model=test_model_dir, clean=clean, damaged=damaged, truncated_model=truncated_model,
                overwritten_model=overwritten_model, existing=existing)


def _train(*sets, out="new"):
    """``train`` with the test model and clean data unless a --set replaces them."""
    def argv(x):
        keys = {s.split("=")[0] for s in sets}
        base = [] if "model.teacher_path" in keys else [f"model.teacher_path={x['model']}"]
        base += [] if "data.path" in keys else [f"data.path={x['clean']}"]
        args = ["train", "-o", str(_out(x, out))]
        for s in base + [s.format(**x) for s in sets]:
            args += ["--set", s]
        return args
    return argv


def _out(x, out):
    return x["existing"] if out == "existing" else x["root"] / "out"


def _generate(*extra, embeds="{clean}", shape="4,2,4,4", model="{model}"):
    def argv(x):
        args = ["generate", "--model", model.format(**x), "-o", str(_out(x, "new")), "--latent-shape", shape]
        if embeds:
            args += ["--embeds", embeds.format(**x)]
        return args + [e.format(**x) for e in extra]
    return argv


def _command(*args, out="new"):
    return lambda x: [a.format(**x) for a in args] + ["-o", str(_out(x, out))]


CASES = [
    # config values: NaN and infinity anywhere, ranges, types (refused before anything is written;
    # with the built-in toy preset, before its dataset would be written into the output folder)
    ("toy lr NaN", lambda x: ["train", "-o", str(_out(x, "new")), "--set", "optim.generator.lr=NaN"],
     "config key 'optim.generator.lr' must be a finite number, got nan"),
    ("lr negative", _train("optim.fake_score.lr=-1"), "optim.fake_score.lr must be positive"),
    ("shift Infinity", _train("dmd.flow_shift=Infinity"), "config key 'dmd.flow_shift' must be a finite number"),
    ("shift zero", _train("dmd.flow_shift=0"), "dmd.flow_shift must be positive"),
    ("max_grad_norm NaN", _train("train.max_grad_norm=NaN"), "'train.max_grad_norm' must be a finite number"),
    ("max_grad_norm negative", _train("train.max_grad_norm=-1"), "train.max_grad_norm must be >= 0"),
    ("guidance negative", _train("dmd.guidance_scale=-5"), "dmd.guidance_scale must be >= 0"),
    ("guidance NaN", _train("dmd.guidance_scale=NaN"), "'dmd.guidance_scale' must be a finite number"),
    ("step entry true", _train("dmd.denoising_steps=[1000,true]"), "dmd.denoising_steps entries must be numbers"),
    ("step entry abc", _train("dmd.denoising_steps=1000,abc"), "dmd.denoising_steps entries must be numbers"),
    ("no steps", _train("dmd.denoising_steps=[]"), "dmd.denoising_steps must list at least one timestep"),
    ("steps increasing", _train("dmd.denoising_steps=[522,1000]"), "dmd.denoising_steps must be in decreasing order"),
    ("step above 1000", _train("dmd.denoising_steps=[1001]"),
     r"dmd.denoising_steps entries must be numbers in \(0, 1000\]"),
    ("betas strings", _train('optim.generator.betas=["a","b"]'), "optim.generator.betas must be two numbers"),
    ("one beta", _train("optim.generator.betas=[0.9]"), "optim.generator.betas must be two numbers"),
    ("beta 1", _train("optim.generator.betas=[0.9,1.0]"), "optim.generator.betas must be two numbers"),
    ("min ratio NaN", _train("dmd.min_timestep_ratio=NaN"), "'dmd.min_timestep_ratio' must be a finite number"),
    ("gan weight -inf", _train("dmd.gan.generator_weight=-Infinity"), "'dmd.gan.generator_weight' must be a finite"),
    ("boundary NaN", _train("model.boundary_ratio=NaN"), "'model.boundary_ratio' must be a finite number"),
    ("ema Infinity", _train("ema.decay=Infinity"), "'ema.decay' must be a finite number"),
    ("vsa NaN", _train("attention.vsa_sparsity=NaN"), "'attention.vsa_sparsity' must be a finite number"),
    ("interval NaN", _train("dmd.guidance_interval=[0,NaN]"), r"'dmd.guidance_interval\[1\]' must be a finite"),
    ("nonfinite mode", _train("train.nonfinite=ignore"), "train.nonfinite must be one of skip, stop"),
    ("skip cap negative", _train("train.max_consecutive_skips=-1"), "train.max_consecutive_skips must be >= 0"),
    ("eps zero", _train("optim.generator.eps=0"), "optim.generator.eps must be positive"),
    ("weight decay negative", _train("optim.generator.weight_decay=-0.1"), "optim.generator.weight_decay must be >= 0"),
    ("latent shape string", _train('data.latent_shape=[4,"a",4,4]'), r"data.latent_shape must be \[C, F, H, W\]"),
    ("existing folder, lr NaN", _train("optim.generator.lr=NaN", out="existing"),
     "'optim.generator.lr' must be a finite"),
    ("existing folder, betas", _train('optim.fake_score.betas=["a","b"]', out="existing"), "betas must be two numbers"),
    # config files
    ("YAML not UTF-8", lambda x: ["train", "-o", str(_out(x, "new")), "-c", str(x["root"] / "latin1.yaml")],
     r"config file .*latin1.yaml is not UTF-8 text \(byte \d+\)"),
    ("JSON not UTF-8", lambda x: ["train", "-o", str(_out(x, "new")), "-c", str(x["root"] / "latin1.json")],
     r"config file .*latin1.json is not UTF-8 text"),
    ("YAML .nan", lambda x: ["train", "-o", str(_out(x, "new")), "-c", str(x["root"] / "nan.yaml")],
     "'dmd.guidance_scale' must be a finite number, got nan"),
    # the machine and the teacher
    ("nccl without GPUs", _train("parallel.backend=nccl"), "parallel.backend=nccl needs CUDA GPUs"),
    ("truncated teacher", _train("model.teacher_path={truncated_model}"),
     r"teacher model weights file .*diffusion_pytorch_model.safetensors is damaged or truncated"),
    ("overwritten teacher header", _train("model.teacher_path={overwritten_model}"),
     r"teacher model weights file .* is damaged or truncated"),
    # generate
    ("generate steps abc", _generate("--steps", "1000,abc"), "--steps must be comma-separated numbers, got '1000,abc'"),
    ("generate steps NaN", _generate("--steps", "1000,NaN"),
     r"--steps entries must be numbers in \(0, 1000\], got nan"),
    ("generate steps order", _generate("--steps", "522,1000"), "--steps must be in decreasing order"),
    ("generate H not divisible", _generate(shape="4,2,3,4"),
     r"latent shape \[4, 2, 3, 4\]: F, H, W must divide by the model's patch size \[1, 2, 2\]"),
    ("generate W not divisible", _generate(shape="4,2,4,5"), "must divide by the model's patch size"),
    ("generate prompts not UTF-8", _generate("--prompts", "{root}/prompts.txt", "--text-encoder", "{root}/none",
                                             embeds=None), r"prompts file .*prompts.txt is not UTF-8 text"),
    ("generate damaged embeds", _generate(embeds="{damaged[truncated shard]}"),
     r"dataset shard .* is damaged or truncated"),
    ("generate truncated model", _generate(model="{truncated_model}"),
     "generator model weights file .* is damaged or truncated"),
    ("generate guidance -inf", _generate("--guidance-scale", "-inf"), "--guidance-scale must be a finite number >= 0"),
    ("generate shift NaN", _generate("--flow-shift", "nan"), "--flow-shift must be a finite number > 0, got nan"),
    # synth
    ("synth guidance NaN", _command("synth", "--teacher", "{model}", "--text-data", "{clean}", "--latent-shape",
                                    "4,2,4,4", "--guidance-scale", "nan"),
     "--guidance-scale must be a finite number >= 0, got nan"),
    ("synth shift inf", _command("synth", "--teacher", "{model}", "--text-data", "{clean}", "--latent-shape",
                                 "4,2,4,4", "--flow-shift", "inf"), "--flow-shift must be a finite number > 0"),
    ("synth damaged text data", _command("synth", "--teacher", "{model}", "--text-data", "{damaged[truncated shard]}",
                                         "--latent-shape", "4,2,4,4"), r"dataset shard .* is damaged or truncated"),
    ("synth truncated teacher", _command("synth", "--teacher", "{truncated_model}", "--text-data", "{clean}",
                                         "--latent-shape", "4,2,4,4"), "teacher model weights file .* is damaged"),
    # other commands' input files
    ("encode-text prompts not UTF-8", _command("encode-text", "--prompts", "{root}/prompts.txt", "--text-encoder",
                                               "{root}/none"), r"prompts file .*prompts.txt is not UTF-8 text"),
    ("encode-images list not UTF-8", _command("encode-images", "--text-data", "{clean}", "--images",
                                              "{root}/images.txt", "--image-encoder", "{root}/none", "--vae",
                                              "{root}/none", "--video-size", "5,32,32"),
     r"images file .*images.txt is not UTF-8 text"),
    ("encode-images jsonl without image", _command("encode-images", "--text-data", "{clean}", "--images",
                                                    "{root}/images.jsonl", "--image-encoder", "{root}/none", "--vae",
                                                    "{root}/none", "--video-size", "5,32,32"),
     r"images.jsonl: every .jsonl line must be an object with an 'image' path"),
]
# every way of damaging a dataset (tests/helpers.py), through train
for _how, (_, _message) in sorted(DATASET_DAMAGE.items()):
    CASES.append((f"dataset: {_how}", _train(f"data.path={{damaged[{_how}]}}"), _message))


def _snapshot(path: Path):
    if not path.exists():
        return None
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "dir"
            for f in sorted(path.rglob("*"))}


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(inputs, name, argv, message):
    args = argv(inputs)
    out = Path(args[args.index("-o") + 1])
    before = _snapshot(out)
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, (result.output, result.exc_info)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("megadmd: error:")]
    assert len(errors) == 1, result.stderr
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in result.output
    assert _snapshot(out) == before
