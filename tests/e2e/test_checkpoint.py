"""Checkpoints as users meet them: kill -9 and resume, a crash inside a save, SIGTERM on one of
two ranks, a damaged newest checkpoint, and resuming on another world size."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import cli_env, free_port, save_test_dataset, save_test_model

STEPS = 8


def _overrides(model, data, out, *extra):
    return [f"output_dir={out}", f"train.max_steps={STEPS}", f"data.path={data}", f"model.teacher_path={model}",
            "logging.interval_steps=1", "checkpoint.interval_steps=3", "checkpoint.keep_last=0",
            "dmd.generator_update_interval=2", "ema.decay=0.9", "dmd.gan.enabled=true", "dmd.gan.hidden_dim=16",
            "train.micro_batch_size=2", *extra]


def _train_args(model, data, out, *extra, resume=None):
    args = ["train"]
    for o in _overrides(model, data, out, *extra):
        args += ["--set", o]
    return args + (["--resume", resume] if resume else [])


def _run(args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "megadmd", *map(str, args)], env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def _scalars(run_dir, tag):
    """The last logged value of ``tag`` at each step, across every event file of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for f in sorted((run_dir / "tensorboard").iterdir(), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(f))
        acc.Reload()
        for e in acc.Scalars(tag) if tag in acc.Tags()["scalars"] else []:
            values[e.step] = e.value
    return values


def _final_weights(run_dir, step=STEPS):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    ck = run_dir / "checkpoints" / f"step-{step:08d}"
    out = {r: get_fp32_state_dict_from_zero_checkpoint(str(ck / r), tag="zero") for r in ("generator", "fake_score")}
    out["ema"] = load_file(str(ck / "ema" / "ema.safetensors"))
    return out


def _assert_same_run(a, b):
    for tag in ("loss/fake_score", "loss/generator", "loss/discriminator", "grad_norm/generator"):
        va, vb = _scalars(a, tag), _scalars(b, tag)
        assert va.keys() == vb.keys() and va, tag
        for step in va:
            assert va[step] == pytest.approx(vb[step], rel=1e-6, abs=1e-9), (tag, step)
    wa, wb = _final_weights(a), _final_weights(b)
    for part in wa:
        for k in wa[part]:
            assert torch.equal(wa[part][k], wb[part][k]), (part, k)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model, data = save_test_model(root / "m"), save_test_dataset(root / "d", num_samples=12)
    ref = root / "reference"
    r = _run(_train_args(model, data, ref))
    assert r.returncode == 0, r.stderr[-3000:]
    return model, data, ref


def test_kill_9_during_training_then_resume_matches_uninterrupted(setup, tmp_path):
    model, data, ref = setup
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "megadmd", *_train_args(model, data, run)], env=cli_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-00000006").is_dir() and time.time() < deadline:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (run / "checkpoints" / "step-00000008").exists()
    r = _run(_train_args(model, data, run, resume="auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    _assert_same_run(ref, run)


def test_crash_in_the_middle_of_a_save_keeps_the_previous_checkpoint(setup, tmp_path):
    model, data, ref = setup
    run = tmp_path / "run"
    r = _run(_train_args(model, data, run), env=dict(cli_env(), MEGADMD_CRASH_POINT="mid-save:6"))
    assert r.returncode != 0  # killed inside the save of step 6, engines written, not renamed
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000003"  # still the previous one
    assert not (ckpts / "step-00000006").exists() and (ckpts / ".step-00000006.incomplete").is_dir()
    r = _run(_train_args(model, data, run, resume="auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step-00000003" in r.stdout
    _assert_same_run(ref, run)


def test_damaged_checkpoint_is_named_and_auto_falls_back(setup, tmp_path):
    import shutil

    model, data, ref = setup
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    newest = run / "checkpoints" / "step-00000008"
    victim = next(newest.glob("generator/zero/*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    r = _run(_train_args(model, data, run, "train.max_steps=9", resume=str(newest)))
    assert r.returncode == 2 and "optim_states.pt has 100 bytes" in r.stderr, r.stderr[-2000:]
    r = _run(_train_args(model, data, run, "train.max_steps=9", resume="auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping damaged checkpoint" in r.stderr and "optim_states.pt" in r.stderr
    assert "resumed from" in r.stdout and "step-00000006" in r.stdout


def test_sigterm_on_one_of_two_ranks_saves_and_exits_cleanly(setup, tmp_path):
    model, data, _ = setup
    run = tmp_path / "run"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "megadmd",
           *_train_args(model, data, run, "train.max_steps=100000", "checkpoint.interval_steps=0")]
    p = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, pids = [], []
    for line in p.stdout:
        lines.append(line)
        pids += re.findall(r"process (\d+) spawned", line)
        if "step 3/100000" in line:
            os.kill(int(pids[-1]), signal.SIGTERM)  # the rank-1 process only
            break
    out = "".join(lines) + p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
    assert "preemption signal received" in out and "preempted:" in out
    saved = sorted((run / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "manifest.json").is_file()
    assert int(saved[0].name[5:]) >= 3


def test_resume_on_one_rank_from_two_ranks_gives_the_same_parameters(setup, tmp_path):
    from tests.distributed.workers import load_and_gather
    from tests.helpers import spawn

    model, data, _ = setup
    run = tmp_path / "run"
    r = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "megadmd",
                        *_train_args(model, data, run, "train.max_steps=6", "train.micro_batch_size=1")],
                       env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
    saved = _final_weights(run, step=6)
    out = tmp_path / "one.pt"
    spawn(load_and_gather, 1, _overrides(model, data, run, "train.max_steps=7", "checkpoint.resume=auto"), str(out))
    got = torch.load(out, weights_only=False)
    assert got["step"] == 6
    for part in ("generator", "fake_score", "ema"):
        for k, v in saved[part].items():
            assert torch.equal(got[part][k], v), (part, k)
