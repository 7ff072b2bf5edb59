"""What an operator sees: progress lines of every long command, and an offline Weights & Biases
run that logs the same scalars as TensorBoard (the default job's console and TensorBoard events
are checked in test_quality.py, which runs that job)."""
import json
import re
import struct
from pathlib import Path

import pytest

from tests.helpers import (TEST_WAN_CONFIG, save_test_dataset, save_test_images, save_test_model, save_tiny_clip,
                           save_tiny_text_encoder, save_tiny_vae, tb_events)

PROMPTS = ["a cat runs on the beach", "a dog in snow", "red bird flies over the sea", "city at night",
           "slow motion video of a cat", "close up of a blue bird"]


# ---------------------------------------------------------------------------------------------
# Progress lines of the long commands, run in this process as a user would call them.


def _cli(monkeypatch, *args):
    from click.testing import CliRunner

    from megadmd import cli

    # every command here runs in the test session's one-process world; leave it up at the end
    monkeypatch.setattr(cli, "shutdown_distributed", lambda: None)
    r = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert r.exit_code == 0, r.output[-3000:] + repr(r.exception)
    return r.output


def _progress_done(output: str, desc: str, count: int, unit: str) -> bool:
    return f"{desc}: {count}/{count} {unit} (100%)" in output


def test_each_long_data_command_shows_progress(tmp_path, monkeypatch, single_process_world):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    encoder = save_tiny_text_encoder(tmp_path / "umt5")
    teacher = save_test_model(tmp_path / "teacher")
    out = _cli(monkeypatch, "encode-text", "--prompts", prompts, "-o", tmp_path / "text", "--text-encoder", encoder,
               "--max-len", "16", "--shard-size", "4", "--batch-size", "2")
    assert _progress_done(out, "encode-text", 6, "prompts") and "encode-text: shard 2/2 written" in out
    out = _cli(monkeypatch, "synth", "--teacher", teacher, "--text-data", tmp_path / "text", "-o", tmp_path / "lat",
               "--latent-shape", "4,2,4,4", "--steps", "2", "--batch-size", "2")
    assert _progress_done(out, "synth", 6, "samples")
    out = _cli(monkeypatch, "encode-images", "--text-data", tmp_path / "text", "--images",
               save_test_images(tmp_path / "images", len(PROMPTS)), "-o", tmp_path / "cond", "--image-encoder",
               save_tiny_clip(tmp_path / "clip"), "--vae", save_tiny_vae(tmp_path / "vae"), "--video-size", "5,32,32")
    assert _progress_done(out, "encode-images", 6, "images")
    out = _cli(monkeypatch, "generate", "--model", teacher, "-o", tmp_path / "gen", "--embeds", tmp_path / "text",
               "--latent-shape", "4,2,4,4", "--batch-size", "2", "--compare-teacher", teacher, "--teacher-steps", "2")
    assert _progress_done(out, "generate (3 steps)", 6, "samples")
    assert _progress_done(out, "teacher (2 steps + CFG)", 6, "samples")


# ---------------------------------------------------------------------------------------------
# A small run with TensorBoard and W&B (offline) side by side, and an EMA to export.


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, single_process_world):
    pytest.importorskip("wandb", reason="wandb is the optional extra megadmd[wandb]; the test extra installs it")
    from megadmd.config import resolve
    from megadmd.runner import run_train

    root = tmp_path_factory.mktemp("small-run")
    model = save_test_model(root / "wan", config=TEST_WAN_CONFIG)
    data = save_test_dataset(root / "data", num_samples=8)
    cfg = resolve(overrides=[
        f"model.teacher_path={model}", f"data.path={data}", f"output_dir={root / 'out'}", "train.max_steps=4",
        "train.micro_batch_size=2", "dmd.generator_update_interval=2", "logging.interval_steps=2",
        "logging.backends=tensorboard,wandb", "ema.decay=0.5", "checkpoint.interval_steps=0"])
    with pytest.MonkeyPatch.context() as mp:
        for key, value in dict(WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true",
                               WANDB_CONSOLE="off").items():
            mp.setenv(key, value)
        run_train(cfg)
    return root


def read_wandb_records(run_file: Path) -> list:
    """The records of an offline run's ``.wandb`` file: W&B's LevelDB-style log (a 7-byte header,
    32 KiB blocks of chunks, each with a 7-byte header: CRC32, length, type 1 full / 2 first /
    3 middle / 4 last) holding ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunks, records = run_file.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


def _history_row(items) -> dict:
    """One logged step: plain values by key; media (histograms, images) as dicts of their fields,
    which W&B stores as items with a nested key [tag, field] (plain values: [tag], or key)."""
    row = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        if len(path) == 1:
            row[path[0]] = json.loads(item.value_json)
        else:
            row.setdefault(path[0], {})["/".join(path[1:])] = json.loads(item.value_json)
    return row


def test_wandb_offline_run_logs_the_same_scalars_as_tensorboard(small_run):
    acc = tb_events(small_run / "out" / "tensorboard")
    run_file = next((small_run / "wandb").glob("offline-run-*/run-*.wandb"))
    records = read_wandb_records(run_file)
    history = [_history_row(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    values = {k: v for row in history for k, v in row.items() if not k.startswith("_")}
    scalars = {k for k, v in values.items() if isinstance(v, (int, float))}
    assert scalars == set(acc.Tags()["scalars"]) and {"loss/generator", "grad_norm/fake_score"} <= scalars
    assert sorted({int(row["_step"]) for row in history}) == [2, 4]
    histograms = {k for k, v in values.items() if isinstance(v, dict) and v.get("_type") == "histogram"}
    assert histograms == set(acc.Tags()["histograms"]) == {"stats/x0_generator", "stats/dmd_grad"}
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    config.update({item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
                   for item in r.config.update})
    assert config["train"]["max_steps"] == 4 and config["logging"]["backends"] == ["tensorboard", "wandb"]
    assert (small_run / "out" / "wandb_run_id").read_text().strip() == run.run_id


def test_convert_and_export_show_progress(small_run, tmp_path, monkeypatch):
    ckpt = small_run / "out" / "checkpoints" / "step-00000004"
    out = _cli(monkeypatch, "convert", "to-diffusers", ckpt, "-o", tmp_path / "generator")
    tensors = re.search(r"convert: fp32 tensors for generator: (\d+)/\1 tensors \(100%\)", out)
    assert tensors and "convert: gathering the generator's ZeRO shards" in out
    out = _cli(monkeypatch, "export-ema", ckpt, "-o", tmp_path / "ema", "--dtype", "bf16")
    assert re.search(rf"convert: bf16 tensors for ema: {tensors.group(1)}/{tensors.group(1)} tensors \(100%\)", out)
