"""The toy teacher's tools: the exact posterior velocity (checked by hand), the training script
(fresh and continued with --init) and the per-noise-level error report."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from megadmd import flow
from megadmd.toy.distribution import ToySpec, modes

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
from train_toy_teacher import exact_velocity  # noqa: E402


def _tool(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_exact_velocity_by_hand():
    spec = ToySpec()
    table = modes(spec)  # [K, M, C, F, H, W]
    labels = torch.tensor([0, 2])
    m = torch.stack([table[0, 1], table[2, 0]])
    # On a scaled mode the posterior is that mode alone (the others are >1 RMS away) and the
    # residual is 0, so x0 = m and v = (x_t - x0) / sigma = ((1 - sigma) m - m) / sigma = -m.
    sigma = 0.3
    t = torch.full((2,), sigma * flow.NUM_TRAIN_TIMESTEPS)
    v = exact_velocity(spec, labels)((1 - sigma) * m, t)
    torch.testing.assert_close(v, -m, atol=1e-5, rtol=0)
    # Off the mode by delta, the posterior mean shrinks delta by (1 - sigma) s^2 / var with
    # var = (1 - sigma)^2 s^2 + sigma^2. At sigma 0.5, s 0.1: var 0.2525, factor 0.005 / 0.2525,
    # so x0 = m + 0.0198 delta and v = (0.5 m + delta - x0) / 0.5 = -m + 1.9604 delta.
    half = torch.full((2,), 0.5 * flow.NUM_TRAIN_TIMESTEPS)
    delta = torch.full_like(m, 0.05)
    v = exact_velocity(spec, labels)(0.5 * m + delta, half)
    torch.testing.assert_close(v, -m + 0.098020, atol=1e-5, rtol=0)
    # At sigma = 1 the input carries no signal: every mode weighs the same, x0 is the mean of the
    # modes (of the class, or of all classes without labels), and v = x_t - x0.
    x = torch.randn(2, *spec.latent_shape, generator=torch.Generator().manual_seed(0))
    t1 = torch.full((2,), float(flow.NUM_TRAIN_TIMESTEPS))
    torch.testing.assert_close(exact_velocity(spec, labels)(x, t1), x - table[labels].mean(1), atol=1e-5, rtol=0)
    all_modes = table.flatten(0, 1).mean(0)
    torch.testing.assert_close(exact_velocity(spec, None)(x, t1), x - all_modes, atol=1e-5, rtol=0)


def test_train_toy_teacher_fresh_then_continued_and_its_error_report(tmp_path):
    small = ["--steps", "3", "--batch-size", "4", "--warmup-steps", "1", "--eval-per-class", "1"]
    first, second = tmp_path / "t1", tmp_path / "t2"
    r = _tool("tools/train_toy_teacher.py", "-o", str(first), "--num-layers", "2", *small)
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads((first / "training.json").read_text())
    assert record["args"]["steps"] == 3 and record["args"]["init"] is None
    assert json.loads((first / "config.json").read_text())["num_layers"] == 2
    assert {row["model"] for row in record["quality"]} == {"true samples", "teacher", "exact velocity"}
    # --evaluate scores the saved teacher: the same table as after training, and nothing written
    ev = _tool("tools/train_toy_teacher.py", "-o", str(tmp_path / "unused"), "--evaluate", str(first), *small)
    assert ev.returncode == 0, ev.stderr[-2000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 10 and [line for line in ev.stdout.splitlines() if line.startswith("| ")] == table
    assert not (tmp_path / "unused").exists()
    ev = _tool("tools/train_toy_teacher.py", "--evaluate", str(tmp_path / "missing"), *small)
    assert ev.returncode != 0 and ev.stderr.strip().splitlines() == [
        f"train_toy_teacher: error: --evaluate teacher folder not found: {tmp_path / 'missing'}"]

    r = _tool("tools/train_toy_teacher.py", "-o", str(second), "--init", str(first), *small)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((second / "training.json").read_text())["args"]["init"] == str(first)
    w1, w2 = (Path(p) / "diffusion_pytorch_model.safetensors" for p in (first, second))
    assert w1.read_bytes() != w2.read_bytes()  # it trained on from there

    bad = tmp_path / "t3"
    r = _tool("tools/train_toy_teacher.py", "-o", str(bad), "--init", str(tmp_path / "missing"), *small)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        f"train_toy_teacher: error: --init teacher folder not found: {tmp_path / 'missing'}"]
    assert not bad.exists()
    r = _tool("tools/train_toy_teacher.py", "-o", str(bad), "--init", str(first), "--num-layers", "6", *small)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "--num-layers must be at least 1, and applies only to a fresh teacher (not with --init)")
    assert not bad.exists()

    r = _tool("tools/toy_teacher_error.py", "--teacher", str(second), "--per-class", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| 0.")]
    assert [float(row[0]) for row in rows] == [0.99, 0.9, 0.757, 0.6, 0.522, 0.4, 0.25, 0.1, 0.03]
    for row in rows:
        sigma, cond, uncond, guided, _, exact_dir = (float(x) for x in row)
        assert cond > 0 and uncond > 0 and guided > 0
        # Below sigma ~0.76 the class is decided, so the exact guidance direction vanishes.
        assert (exact_dir == 0.0) == (sigma <= 0.757)


def test_toy_last_step_rows_agree_where_student_and_teacher_are_one_model(tmp_path):
    """With the teacher itself as the 'student', finishing its chain with the teacher's x0 is the
    student's own last step, row for row; a missing --generator fails in one line."""
    from megadmd.toy.builtin import builtin_teacher_dir

    r = _tool("tools/toy_last_step.py", "--generator", str(builtin_teacher_dir()), "--per-class", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {line.split("|")[1].strip(): [float(x) for x in line.split("|")[2:-1]]
            for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| sampler")}
    assert len(rows) == 7
    assert rows["student, 3 steps"] == rows["student 2 steps, teacher x0 at t=522"]
    assert rows["student 2 steps, student ODE from 0.522"] == rows["student 2 steps, teacher ODE from 0.522"]
    assert rows["true x at 0.522, student last step"] == rows["true x at 0.522, teacher x0"]
    assert rows["student, 3 steps"] != rows["student 2 steps, teacher ODE from 0.522"]
    for values in rows.values():
        assert 0 <= values[0] <= 1 and values[3] <= values[4] <= values[5]  # precision; ordered quantiles

    r = _tool("tools/toy_last_step.py", "--generator", str(tmp_path / "missing"))
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        f"toy_last_step: error: --generator folder not found: {tmp_path / 'missing'}"]


def test_toy_last_step_fit_lowers_the_regression_error_and_adds_a_row(tmp_path):
    """--fit-steps fits the last step to the teacher's ODE on the student's own inputs: the fit
    lowers its training-pool MSE and adds one scored row; bad fit settings fail in one line."""
    from megadmd.toy.builtin import builtin_teacher_dir

    r = _tool("tools/toy_last_step.py", "--generator", str(builtin_teacher_dir()), "--per-class", "2",
              "--fit-steps", "20", "--fit-per-class", "4", "--fit-lr", "1e-3")
    assert r.returncode == 0, r.stderr[-2000:]
    fitted = [line for line in r.stdout.splitlines() if "last step fitted to the teacher ODE (20 steps)" in line]
    assert len(fitted) == 1 and 0 <= float(fitted[0].split("|")[2]) <= 1
    mse = [line for line in r.stdout.splitlines() if line.startswith("fit: training-pool MSE")]
    before, after = (float(v) for v in mse[0].split("MSE ")[1].split(" -> "))
    assert after < before

    r = _tool("tools/toy_last_step.py", "--generator", str(builtin_teacher_dir()), "--fit-steps", "-1")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "--fit-steps must be >= 0 and --fit-lr positive")
