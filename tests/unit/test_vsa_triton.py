"""The triton VSA backend under Triton's CPU interpreter, against the torch backend.

Its own file so that its time shows on its own line in `pytest --durations`.

Why a child process: Triton decides at `import triton` whether its own library functions (tl.max,
tl.sum, ...) are interpreted, and in a test session diffusers imports triton long before this
file runs. So the kernels are run once, by this file executed as a script with
TRITON_INTERPRET=1 (the `child` fixture), which compares them with the torch backend and prints
one JSON line; each test below asserts on its part of that report. The interpreter runs every
kernel program in Python, so the grids are tiny (8 cubes, partial ones at the edges) and the
head dims small.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

GRID = (5, 6, 7)  # 2 x 2 x 2 cubes; every cube but one is partial (padded key slots)

# Tolerances against the torch backend run in fp32 on the same (rounded) inputs: fp32 differs
# only in summation order; half precision rounds P and dS to the input dtype before the second
# products (as FlashAttention does) and the outputs to the input dtype.
TOL = {
    "float32": dict(rtol=1e-5, atol=2e-6),
    "float16": dict(rtol=5e-3, atol=2e-3),
    "bfloat16": dict(rtol=4e-2, atol=2e-2),
}

# name: (grid, head_dim, dtype, sparsity, heads, seed). Sparsity 0 / 0.5 / 0.9 keep 8 / 4 / 1 of
# 8 cubes. The interpreter's time goes with programs x selected cubes, hence one head where two
# add nothing (two heads check the per-head offsets of every kernel in the other cases). Wan's
# head dims, 64 and 128, run in each dtype; 16 where the case is about the selection.
FINE_CASES = {
    "fp32-sparsity-0.0": (GRID, 16, "float32", 0.0, 1, 0),
    "fp32-sparsity-0.5-d64": (GRID, 64, "float32", 0.5, 2, 0),
    "fp32-sparsity-0.9-d128": (GRID, 128, "float32", 0.9, 1, 0),
    "bf16-sparsity-0.5-d64": (GRID, 64, "bfloat16", 0.5, 1, 1),
    "bf16-sparsity-0.9-d128": (GRID, 128, "bfloat16", 0.9, 1, 2),
    "fp16-sparsity-0.9-d64": (GRID, 64, "float16", 0.9, 1, 1),
    "fp16-sparsity-0.9-d128": (GRID, 128, "float16", 0.9, 1, 3),
    "head-dim-24": ((4, 4, 9), 24, "float32", 0.5, 2, 2),  # zero-padded to 32 inside; scale 1/sqrt(24)
    "divisible-grid": ((4, 8, 4), 16, "float32", 0.5, 2, 3),  # no padded slots at all
}


# --- the child: runs the kernels under the interpreter -------------------------------------------


def _excess(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> float:
    """max |got - want| / (atol + rtol |want|): at most 1 where torch.testing.assert_close passes."""
    return ((got.double() - want.double()).abs() / (atol + rtol * want.double().abs())).max().item()


def _random_selection(tiling, batch, heads, topk, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = batch * heads * tiling.num_cubes
    picks = [torch.randperm(tiling.num_cubes, generator=generator)[:topk].sort().values for _ in range(rows)]
    return torch.stack(picks).view(batch, heads, tiling.num_cubes, topk)


def _fine_and_grads(fine, qkv, kv_cubes, tiling, grad_out):
    inputs = [x.detach().requires_grad_() for x in qkv]
    out = fine(*inputs, kv_cubes, tiling)
    return [out, *torch.autograd.grad(out, inputs, grad_out)]


def _fine_case(grid, dim, dtype_name, sparsity, heads, seed) -> dict:
    from megadmd.attention.vsa import cube_tiling, tile_tokens, vsa_topk
    from megadmd.attention.vsa_torch import block_sparse_attention
    from megadmd.attention.vsa_triton import triton_block_sparse_attention

    dtype = getattr(torch, dtype_name)
    tiling = cube_tiling(grid)
    generator = torch.Generator().manual_seed(seed)
    shape = (1, math.prod(grid), heads, dim)
    tensors = [tile_tokens(torch.randn(shape, generator=generator), tiling).to(dtype) for _ in range(4)]
    qkv, grad_out = tensors[:3], tensors[3]
    kv_cubes = _random_selection(tiling, 1, heads, vsa_topk(sparsity, tiling.num_cubes), seed)
    got = _fine_and_grads(triton_block_sparse_attention, qkv, kv_cubes, tiling, grad_out)
    want = _fine_and_grads(block_sparse_attention, [x.float() for x in qkv], kv_cubes, tiling, grad_out.float())
    valid = tiling.slot_valid_ct.reshape(-1)  # padded query slots are dropped by untiling
    report = {}
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        report[name] = {
            "dtype": str(g.dtype).removeprefix("torch."),
            "finite": bool(torch.isfinite(g).all()),
            "excess": _excess(g[:, :, valid], w[:, :, valid], **TOL[dtype_name]),
        }
    # Padded key slots must receive no gradient: they are masked out of every softmax.
    report["padded_key_grads_zero"] = bool(all(torch.all(g[:, :, ~valid] == 0) for g in got[2:]))
    return report


def _whole_vsa_case() -> dict:
    # Coarse stage, selection, gate and untiling around the triton fine stage; gate gradient too.
    from megadmd.attention.vsa import video_sparse_attention

    generator = torch.Generator().manual_seed(4)
    shape = (1, math.prod(GRID), 2, 16)
    inputs = [torch.randn(shape, generator=generator) for _ in range(4)]
    grad_out = torch.randn(shape, generator=generator)
    results = {}
    for backend in ("triton", "torch"):
        leaves = [x.clone().requires_grad_() for x in inputs]
        out = video_sparse_attention(*leaves, GRID, 0.75, backend=backend)  # 2 of 8 cubes
        results[backend] = [out, *torch.autograd.grad(out, leaves, grad_out)]
    names = ("out", "dq", "dk", "dv", "dgate")
    return {n: _excess(g, w, **TOL["float32"]) for n, g, w in zip(names, results["triton"], results["torch"])}


def _misc_cases() -> dict:
    from megadmd.attention.vsa import resolve_vsa_backend, video_sparse_attention
    from megadmd.attention.vsa_triton import INTERPRETED, _inverse_selection

    # One (batch, head), three cubes: query cube 0 picks keys {0, 2}, 1 picks {2, 1}, 2 picks {2, 0}.
    offsets, q_cubes = _inverse_selection(torch.tensor([[[[0, 2], [2, 1], [2, 0]]]], dtype=torch.int32), 3)
    q64 = torch.zeros(1, 64, 1, 16, dtype=torch.float64)
    try:
        video_sparse_attention(q64, q64, q64, q64, (4, 4, 4), 0.5, backend="triton")
        fp64_error = None
    except RuntimeError as err:
        fp64_error = str(err)
    return {
        "interpreted": INTERPRETED,
        "resolved_on_cpu": resolve_vsa_backend("triton", torch.device("cpu")),
        "offsets": offsets.tolist(),
        "q_cubes": q_cubes.tolist(),
        "fp64_error": fp64_error,
    }


def run_child() -> dict:
    report, seconds = {"misc": _misc_cases()}, {}
    for name, case in FINE_CASES.items():
        start = time.perf_counter()
        report[name] = _fine_case(*case)
        seconds[name] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    report["whole-vsa"] = _whole_vsa_case()
    seconds["whole-vsa"] = round(time.perf_counter() - start, 2)
    report["seconds"] = seconds
    return report


# --- the tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def child() -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (it comes with pip install -e '.[test]' on Linux)")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=repo, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"the interpreter run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"interpreter seconds per case: {report['seconds']}")
    return report


@pytest.mark.parametrize("case", FINE_CASES)
def test_fine_stage_matches_torch_backend(child, case):
    """Forward and dq, dk, dv of the triton kernels equal the torch backend's within the dtype's
    tolerance, on grids with partial cubes, at sparsity 0, 0.5 and 0.9, fp32, bf16 and fp16."""
    report, dtype = child[case], FINE_CASES[case][2]
    for name in ("out", "dq", "dk", "dv"):
        assert report[name]["dtype"] == dtype and report[name]["finite"], (name, report[name])
        assert report[name]["excess"] <= 1.0, (name, report[name])
    assert report["padded_key_grads_zero"]


def test_whole_vsa_with_triton_backend_matches_torch_backend(child):
    assert all(excess <= 1.0 for excess in child["whole-vsa"].values()), child["whole-vsa"]


def test_kernels_ran_under_the_interpreter_and_resolve_on_cpu(child):
    assert child["misc"]["interpreted"] is True
    assert child["misc"]["resolved_on_cpu"] == "triton"


def test_inverse_selection_by_hand(child):
    # Key cube 0 <- queries 0, 2; key cube 1 <- query 1; key cube 2 <- queries 0, 1, 2.
    assert child["misc"]["offsets"] == [0, 2, 3, 6]
    assert child["misc"]["q_cubes"] == [0, 2, 1, 0, 1, 2]


def test_explicit_triton_refuses_fp64(child):
    assert "fp16, bf16 or fp32" in (child["misc"]["fp64_error"] or "")


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the test fixture `child` does)")
    print(json.dumps(run_child()))
