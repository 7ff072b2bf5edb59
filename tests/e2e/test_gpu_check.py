"""`bash tools/gpu_check.sh --dry-run`: the GPU acceptance script end to end on the CPU at toy sizes
(the same code as on a GPU: every available VSA backend, the triton kernels under Triton's
interpreter, megadmd's trainer and `megadmd generate`), writing the fields a GPU run writes."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import cli_env

REPO = Path(__file__).resolve().parents[2]

ROW_FIELDS = {"grid", "tokens", "mode", "backend", "sparsity", "topk", "num_cubes", "best_s", "first_s", "speedup"}
DMD_FIELDS = {"status", "sparsity", "build_s", "s_per_iter", "mean_s_per_iter", "vsa_backend", "optimizer",
              "zero_stage", "precision", "activation_checkpointing", "peak_allocated_gib", "peak_reserved_gib",
              "context_gib", "peak_device_gib", "plan_total_gib", "plan_overhead_gib", "plan_peak_phase",
              "plan_command", "seconds"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (it comes with pip install -e '.[test]' on Linux)")
    out = tmp_path_factory.mktemp("gpu-check")
    # A generous budget: the CI machine is shared, and this run checks the code, not the speed.
    # the test process's own one-rank world (MASTER_PORT etc.) set by other tests on this worker
    # stays out: gpu_check also drops it for its parts, this checks the script as users run it
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--out", str(out), "--dry-run", "--budget-s", "1800"],
                          cwd=REPO, capture_output=True, text=True, timeout=2400, env=cli_env())
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((out / "logs").glob("*.log")))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{logs}"
    return out, json.loads((out / "gpu_check.json").read_text())


def test_dry_run_writes_every_part_and_field(dry_run):
    out, report = dry_run
    assert report["dry_run"] is True and report["machine"]["triton_interpret"] is True
    for part in ("prepare", "attention", "dmd", "generate"):
        assert report[part]["status"] == "ok", report[part]
    attention = report["attention"]
    assert attention["backends"] == ["torch", "flex", "triton"]  # fastvideo needs CUDA
    assert "fastvideo" in attention["skipped_backends"]
    assert set(attention["check_vs_torch_max_abs"]) == {"flex", "triton"}
    for row in attention["rows"]:
        assert set(row) == ROW_FIELDS
    combos = {(r["mode"], r["backend"], r["sparsity"]) for r in attention["rows"]}
    assert combos == {(m, b, s) for m in ("fwd", "fwdbwd") for b in ("torch", "flex", "triton") for s in (0.8, 0.9)} | {
        ("fwd", "dense", None), ("fwdbwd", "dense", None)}
    # bf16 on a 5x6x7 grid: every backend agrees with the torch backend to bf16 precision.
    for diffs in attention["check_vs_torch_max_abs"].values():
        assert max(diffs.values()) < 0.1, diffs


def test_dry_run_trains_dense_and_sparse_with_the_client_adamw(dry_run):
    _, report = dry_run
    runs = report["dmd"]["runs"]
    for label, sparsity in (("dense", 0.0), ("vsa", 0.9)):
        run = runs[label]
        assert set(run) == DMD_FIELDS, set(run) ^ DMD_FIELDS
        assert run["sparsity"] == sparsity and run["zero_stage"] == 3 and run["optimizer"] == "AdamW"
        assert all(run["activation_checkpointing"].values()) and run["mean_s_per_iter"] > 0
        assert run["peak_device_gib"] is None  # no GPU memory to measure on a CPU
        assert run["plan_total_gib"] > 0
    assert runs["dense"]["vsa_backend"] is None and runs["vsa"]["vsa_backend"] == "triton"


def test_dry_run_times_generate_and_writes_the_tables(dry_run):
    out, report = dry_run
    generate = report["generate"]
    assert generate["student_steps"] == 3 and generate["teacher_steps"] == 6  # 50 on a GPU
    assert generate["teacher_s_per_sample"] > generate["student_s_per_sample"] > 0
    names = [t["name"] for t in report["targets"]]
    assert names == ["VSA 0.9 forward vs dense, 210 tokens", "VSA 0.9 forward+backward vs dense, 210 tokens",
                     "DMD iteration: VSA 0.9 faster than dense",
                     "DMD peak GPU memory within 10% of megadmd plan (dense)",
                     "DMD peak GPU memory within 10% of megadmd plan (vsa)"]
    assert [t["met"] for t in report["targets"][3:]] == [None, None]  # not measured without a GPU
    text = (out / "gpu_check.md").read_text()
    assert text.startswith("# megadmd GPU check: DRY RUN")
    assert "| target | required | measured | met | note |" in text and "teacher, 6 steps + CFG" in text


def test_gpu_check_without_out_is_refused():
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "give --out DIR" in proc.stderr


def test_gpu_check_wheels_folder_must_come_from_gpu_wheels(tmp_path):
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--out", str(tmp_path / "o"), "--wheels", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "no requirements.txt" in proc.stderr and "gpu_wheels.sh" in proc.stderr


def test_gpu_run_without_a_gpu_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
