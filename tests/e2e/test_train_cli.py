"""``megadmd train`` as users call it: under the deepspeed launcher on 2 processes, and on bad input."""
import subprocess
import sys

import pytest

from tests.helpers import cli_env

TAGS = {
    "loss/generator", "loss/fake_score", "grad_norm/generator", "grad_norm/fake_score",
    "lr/generator", "lr/fake_score", "time/step_s", "throughput/samples_per_s",
    "memory/max_rss_gib", "stats/x0_generator_mean", "stats/x0_generator_std",
}


def _event_tags(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e") / "data"
    r = subprocess.run([sys.executable, "-m", "megadmd", "make-dataset", "-o", str(root), "-n", "16",
                        "--latent-shape", "4,4,8,8", "--text-len", "4", "--text-dim", "32"],
                       env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return root


def test_train_two_processes_under_deepspeed_writes_tensorboard(tmp_path, tiny_dataset):
    out = tmp_path / "run"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", "29613", "--module", "megadmd", "train",
           "-o", str(out), "--max-steps", "6", "--set", f"data.path={tiny_dataset}",
           "--set", "logging.interval_steps=2", "--set", "train.micro_batch_size=2"]
    r = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world=2 dp=2 sp=1" in r.stdout
    assert (out / "config.json").is_file()
    acc = _event_tags(out / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    assert TAGS <= tags, TAGS - tags
    steps = [e.step for e in acc.Scalars("loss/fake_score")]
    assert steps == [2, 4, 6]
    assert [e.step for e in acc.Scalars("loss/generator")] == [6]  # generator updates at iteration 5


def test_bad_input_fails_with_one_line_and_writes_nothing(tmp_path, tiny_dataset):
    out = tmp_path / "never"
    cmd = [sys.executable, "-m", "megadmd", "train", "-o", str(out), "--set", f"data.path={tiny_dataset}",
           "--set", "model.teacher_path=/nonexistent/wan"]
    r = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("megadmd: error:")]
    assert len(lines) == 1 and "teacher model folder not found: /nonexistent/wan" in lines[0], r.stderr
    assert not out.exists()


@pytest.mark.parametrize("override, message", [
    ("dmd.guidance=3", "unknown config key 'dmd.guidance'"),
    ("train.max_steps=many", "'train.max_steps' must be int"),
    ("parallel.sp_size=2", "world size 1 is not divisible by parallel.sp_size=2"),
    ("parallel.sp_size=0", "parallel.sp_size must be positive"),
])
def test_config_errors_name_the_key(tmp_path, override, message):
    r = subprocess.run([sys.executable, "-m", "megadmd", "train", "-o", str(tmp_path / "x"), "--set", override],
                       env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr
    assert not (tmp_path / "x").exists()


def test_train_under_torchrun_and_as_a_plain_process(tmp_path, tiny_dataset):
    common = ["train", "--max-steps", "2", "--set", f"data.path={tiny_dataset}", "--set", "logging.interval_steps=1"]
    r = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", "29614", "-m", "megadmd", *common,
                        "-o", str(tmp_path / "torchrun")], env=cli_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "world=2 dp=2" in r.stdout and "step 2/2" in r.stdout
    r = subprocess.run(["megadmd", *common, "-o", str(tmp_path / "plain")], env=cli_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "world=1 dp=1" in r.stdout and "step 2/2" in r.stdout
