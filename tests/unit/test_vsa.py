"""Video Sparse Attention: tiling, top-k budget, coarse and fine stages, backends, resolver.

References are independent of the code under test: SDPA for dense attention, a masked S x S
attention for the fine stage, and hand-built cube means for the coarse stage.
"""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from megadmd.attention import vsa, vsa_torch
from megadmd.attention.vsa import (
    cube_tiling,
    dense_attention_with_block_mask,
    resolve_vsa_backend,
    tile_tokens,
    untile_tokens,
    video_sparse_attention,
    vsa_topk,
)
from megadmd.attention.vsa_flex import flex_supported
from megadmd.attention.vsa_torch import block_sparse_attention

F64 = torch.float64


def _inputs(grid, batch=2, heads=2, dim=16, dtype=F64, seed=0, count=4):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, math.prod(grid), heads, dim)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for _ in range(count)]


def _random_selection(tiling, batch, heads, topk, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = batch * heads * tiling.num_cubes
    picks = torch.stack([torch.randperm(tiling.num_cubes, generator=generator)[:topk] for _ in range(rows)])
    return picks.view(batch, heads, tiling.num_cubes, topk).sort(-1).values


def _sdpa_bshd(q, k, v):
    out_bhsd = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out_bhsd.transpose(1, 2)


# --- tiling -----------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(8, 8, 8), (5, 6, 7), (1, 3, 9), (4, 4, 4)])
def test_tile_round_trip_and_cube_sizes(grid):
    tiling = cube_tiling(grid)
    (x,) = _inputs(grid, count=1)
    x_bhpd = tile_tokens(x, tiling)
    assert x_bhpd.shape == (2, 2, tiling.num_cubes * 64, 16)
    assert torch.equal(untile_tokens(x_bhpd, tiling), x)
    # Padded slots hold zeros, valid slots hold every token exactly once.
    assert torch.all(x_bhpd[:, :, ~tiling.slot_valid_ct.reshape(-1)] == 0)
    tokens = tiling.tile_index[tiling.slot_valid_ct.reshape(-1)]
    assert sorted(tokens.tolist()) == list(range(math.prod(grid)))
    # Valid tokens per cube = outer product of per-axis tile extents (4 except the remainder).
    extents = [[min(4, n - 4 * i) for i in range(-(-n // 4))] for n in grid]
    expected = torch.tensor([a * b * c for a in extents[0] for b in extents[1] for c in extents[2]])
    assert torch.equal(tiling.cube_sizes, expected)
    assert tiling.all_full == all(n % 4 == 0 for n in grid)


def test_tile_order_by_hand():
    # Grid 1x3x9: three cubes along w; tokens inside a cube in (f, h, w) raster order.
    tiling = cube_tiling((1, 3, 9))
    cubes = tiling.tile_index.view(3, 64)
    assert cubes[0, :12].tolist() == [0, 1, 2, 3, 9, 10, 11, 12, 18, 19, 20, 21]
    assert cubes[1, :12].tolist() == [4, 5, 6, 7, 13, 14, 15, 16, 22, 23, 24, 25]
    assert cubes[2, :3].tolist() == [8, 17, 26]
    assert torch.all(cubes[2, 3:] == 27)  # the padding marker is the token count
    assert tiling.cube_sizes.tolist() == [12, 12, 3]


def test_tile_gradient_is_the_inverse_reorder():
    tiling = cube_tiling((5, 6, 7))
    (x,) = _inputs((5, 6, 7), count=1)
    weight_bhpd = torch.randn(2, 2, tiling.num_cubes * 64, 16, dtype=F64)
    (tile_tokens(x, tiling) * weight_bhpd).sum().backward()
    assert torch.equal(x.grad, untile_tokens(weight_bhpd, tiling))


# --- top-k budget -----------------------------------------------------------------------------


def test_vsa_topk_hand_values():
    assert vsa_topk(0.9, 455) == 46
    assert vsa_topk(0.8, 455) == 91
    assert vsa_topk(0.0, 455) == 455
    assert vsa_topk(1.0, 455) == 1
    assert vsa_topk(0.7, 100) == 30  # not 31: (1 - 0.7) * 100 is 30.000000000000004 in floats
    assert vsa_topk(0.5, 3) == 2
    with pytest.raises(ValueError):
        vsa_topk(1.5, 10)


# --- whole VSA against dense ------------------------------------------------------------------


def test_sparsity_zero_with_zero_gate_is_dense_attention():
    grid = (5, 6, 7)
    q, k, v, _ = _inputs(grid)
    gate = torch.zeros_like(q)
    grad_out = torch.randn_like(q)
    out = video_sparse_attention(q, k, v, gate, grid, sparsity=0.0)
    ref = _sdpa_bshd(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# --- fine stage -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid,topk,chunk_bytes",
    [
        ((5, 6, 7), 3, 1),  # one query cube per chunk: dK/dV accumulate across chunks
        ((5, 6, 7), 3, 1 << 30),  # a single chunk
        ((5, 6, 7), 1, 1 << 30),
        ((5, 6, 7), 8, 1 << 30),  # every cube selected
        ((8, 4, 12), 2, 1 << 30),  # divisible grid: no padded keys
    ],
)
def test_fine_stage_matches_masked_dense_reference(grid, topk, chunk_bytes, monkeypatch):
    monkeypatch.setitem(vsa_torch._CHUNK_BYTES, "cpu", chunk_bytes)
    _check_fine_stage(grid, topk)


@pytest.mark.parametrize("topk,block_cubes,threads", [(3, 2, 1), (8, 3, 1), (5, 1, 1), (3, 2, 3)])
def test_fine_stage_query_blocks_match_reference(topk, block_cubes, threads, monkeypatch):
    # The CPU backward, key cube by key cube over blocks of the query cubes that selected it:
    # partial last blocks, key cubes nobody selected (topk 3 of 8), and with 3 workers the dQ
    # of each worker summed at the end.
    monkeypatch.setattr(vsa_torch, "_QUERY_BLOCK_CUBES", block_cubes)
    monkeypatch.setitem(vsa_torch._CHUNK_BYTES, "cpu", 1)
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_fine_stage((5, 6, 7), topk)
    finally:
        torch.set_num_threads(caller_threads)


def test_fine_stage_fp32_gradients_stay_at_fp32_rounding():
    # The key-major backward takes L from the flash kernel's log-sum-exp and delta from the
    # fp32 output. Measured 0.5e-6 to 1.8e-6 of the largest entry off the fp64 result here
    # (0.8e-6 to 1.7e-6 at 29k tokens, head dim 128), so 3e-5 is a fail line that a real
    # error (a wrong block, a stale buffer) crosses by orders.
    grid, topk = (9, 8, 13), 5  # partial cubes: padded key slots
    tiling = cube_tiling(grid)
    q, k, v = (tile_tokens(x, tiling).detach() for x in _inputs(grid, count=3))
    kv_cubes = _random_selection(tiling, 2, 2, topk, 0)
    grad_out = torch.randn_like(q)

    def grads(dtype):
        inputs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out = block_sparse_attention(*inputs, kv_cubes, tiling)
        return torch.autograd.grad(out, inputs, grad_out.to(dtype))

    for got, want in zip(grads(torch.float32), grads(F64)):
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 3e-5


def test_fine_stage_bmm_forward_matches_reference(monkeypatch):
    # The forward off CPU (bmm, exp2, bmm); on CPU it is PyTorch's flash kernel per chunk.
    monkeypatch.setattr(vsa_torch, "_flash_on", lambda device: False)
    monkeypatch.setitem(vsa_torch._CHUNK_BYTES, "cpu", 1)
    _check_fine_stage((5, 6, 7), 3)


def _check_fine_stage(grid, topk):
    tiling = cube_tiling(grid)
    q, k, v = (tile_tokens(x, tiling).detach().requires_grad_() for x in _inputs(grid, count=3))
    for seed in range(2):
        kv_cubes = _random_selection(tiling, 2, 2, topk, seed)
        grad_out = torch.randn_like(q)
        out = block_sparse_attention(q, k, v, kv_cubes, tiling)
        ref = dense_attention_with_block_mask(q, k, v, kv_cubes, tiling)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
        # The autograd backward recomputes P from the forward's log-sum-exp; the flex backend
        # calls the same backward without one (its CPU forward cannot return it).
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        bias = vsa_torch.key_bias_ct(tiling, F64)
        no_lse = vsa_torch.block_sparse_backward(q, k, v, grad_out, kv_cubes, bias, None)
        for got, got_no_lse, want in zip(grads, no_lse, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(got_no_lse, want, rtol=1e-10, atol=1e-10)


def test_vsa_end_to_end_equals_reference_composition():
    # Whole VSA at topk < num_cubes against coarse + masked reference fine stage, built here.
    grid, sparsity = (5, 6, 7), 0.6
    tiling = cube_tiling(grid)
    q, k, v, gate = _inputs(grid)
    out = video_sparse_attention(q, k, v, gate, grid, sparsity)
    q_t, k_t, v_t = (tile_tokens(x, tiling) for x in (q, k, v))
    coarse_bhcd, scores = vsa_torch.coarse_attention(q_t, k_t, v_t, tiling)
    kv_cubes = scores.topk(vsa_topk(sparsity, tiling.num_cubes), dim=-1).indices
    fine = untile_tokens(dense_attention_with_block_mask(q_t, k_t, v_t, kv_cubes, tiling), tiling)
    ref = gate * coarse_bhcd[:, :, tiling.cube_of_token].transpose(1, 2) + fine
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, gate), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v, gate), grad_out)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# --- coarse stage -----------------------------------------------------------------------------


def test_coarse_stage_by_hand_on_two_cubes():
    # Grid 4x4x5: cube 0 holds w in 0..3 (64 tokens), cube 1 holds w = 4 (16 tokens).
    grid, dim = (4, 4, 5), 8
    q, k, v = _inputs(grid, batch=1, heads=1, dim=dim, count=3)
    gate = torch.ones_like(q).requires_grad_()
    out = video_sparse_attention(q, k, v, gate, grid, sparsity=0.0)

    def cube_means(x):  # [1, 80, 1, D] -> [2, D], means over the tokens of each cube
        x_fhwd = x.view(4, 4, 5, dim)
        return torch.stack([x_fhwd[:, :, :4].mean((0, 1, 2)), x_fhwd[:, :, 4].mean((0, 1))])

    q_c, k_c, v_c = cube_means(q), cube_means(k), cube_means(v)
    coarse_cd = torch.softmax(q_c @ k_c.T / math.sqrt(dim), dim=-1) @ v_c
    w_of_token = torch.arange(80) % 5
    coarse_bshd = coarse_cd[(w_of_token == 4).long()].view(1, 80, 1, dim)
    ref = coarse_bshd + _sdpa_bshd(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

    # The gate gradient is the broadcast coarse output, and q, k, v learn through the coarse path.
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, gate), grad_out)
    want = torch.autograd.grad(ref, (q, k, v), grad_out)
    torch.testing.assert_close(got[3], grad_out * coarse_bshd, rtol=1e-10, atol=1e-10)
    for g, w in zip(got[:3], want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_selection_keeps_largest_coarse_scores():
    scores = torch.tensor([[[[0.1, 0.9, 0.5, -1.0], [3.0, 2.0, 1.0, 0.0]]]])
    assert vsa_torch.select_key_cubes(scores, 2).tolist() == [[[[1, 2], [0, 1]]]]


# --- backends ---------------------------------------------------------------------------------


_FLEX_OK, _FLEX_WHY = flex_supported(torch.device("cpu"))


# Runs on the pinned torch 2.13; skipped only on a torch without CPU FlexAttention (before 2.5),
# where the flex backend is refused at start-up and the torch backend is the only one.
@pytest.mark.skipif(not _FLEX_OK, reason=f"flex backend unavailable: {_FLEX_WHY}")
def test_flex_backend_matches_torch_backend():
    # fp32 (CPU flex refuses fp64); a non-divisible grid exercises the padded-key mask_mod.
    grid = (5, 6, 7)
    q, k, v, gate = (x.detach().float().requires_grad_() for x in _inputs(grid, dim=32))
    with torch.no_grad():
        fwd_flex = video_sparse_attention(q, k, v, gate, grid, 0.5, backend="flex")
        fwd_torch = video_sparse_attention(q, k, v, gate, grid, 0.5, backend="torch")
    torch.testing.assert_close(fwd_flex, fwd_torch, rtol=1e-5, atol=1e-5)
    # With grad: compiled flex forward + chunked backward on CPU, against the torch backend.
    out_flex = video_sparse_attention(q, k, v, gate, grid, 0.5, backend="flex")
    out_torch = video_sparse_attention(q, k, v, gate, grid, 0.5, backend="torch")
    grad_out = torch.randn_like(out_flex)
    grads_flex = torch.autograd.grad(out_flex, (q, k, v, gate), grad_out)
    grads_torch = torch.autograd.grad(out_torch, (q, k, v, gate), grad_out)
    for got, want in zip(grads_flex, grads_torch):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_resolver_explicit_names():
    cpu = torch.device("cpu")
    assert resolve_vsa_backend("torch", cpu) == "torch"
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_vsa_backend("fastvideo", cpu)
    with pytest.raises(RuntimeError, match="flex"):
        resolve_vsa_backend("flex", torch.device("meta"))
    with pytest.raises(ValueError, match="unknown VSA backend"):
        resolve_vsa_backend("cuda-graphs", cpu)


def test_resolver_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_vsa_backend("triton", torch.device("cpu"))


def test_resolver_auto_falls_back_and_logs_once(caplog):
    vsa._log_choice_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="megadmd.attention.vsa"):
        # On CPU, fastvideo cannot run and flex is passed over as slower: auto settles on torch.
        assert resolve_vsa_backend("auto", torch.device("cpu")) == "torch"
        assert resolve_vsa_backend("auto", torch.device("cpu")) == "torch"
    records = [r for r in caplog.records if r.name == "megadmd.attention.vsa"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "auto -> torch" in message
    assert all(name in message for name in ("fastvideo", "triton", "flex"))
    vsa._log_choice_once.cache_clear()


def test_resolver_auto_on_cpu_never_imports_triton(monkeypatch):
    def no_import():
        raise AssertionError("auto on CPU must not import the triton backend")

    monkeypatch.setattr(vsa, "_import_triton_backend", no_import)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even with the interpreter on
    assert resolve_vsa_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize(
    "fastvideo,triton,expected",
    [(True, True, "fastvideo"), (False, True, "triton"), (False, False, "flex")],
)
def test_resolver_auto_order_on_cuda(monkeypatch, caplog, fastvideo, triton, expected):
    # Pretend CUDA with working flex; FastVideo's kernels and triton importable or not.
    monkeypatch.setattr(vsa.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(vsa, "flex_supported", lambda device: (True, ""))
    missing = (None, "No module named 'x'")
    monkeypatch.setattr(vsa, "_import_fastvideo_vsa", lambda: (len, None) if fastvideo else missing)
    fake_triton = type("FakeTritonBackend", (), {"INTERPRETED": False})
    monkeypatch.setattr(vsa, "_import_triton_backend", lambda: (fake_triton, None) if triton else missing)
    vsa._log_choice_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="megadmd.attention.vsa"):
        assert resolve_vsa_backend("auto", torch.device("cuda")) == expected
        assert resolve_vsa_backend("auto", torch.device("cuda")) == expected
    messages = [r.getMessage() for r in caplog.records if r.name == "megadmd.attention.vsa"]
    assert messages == [messages[0]] and f"auto -> {expected} on cuda" in messages[0]
    vsa._log_choice_once.cache_clear()


def test_profile_tool_prints_every_stage_and_the_forward_ceiling():
    # tools/profile_vsa.py at a toy size: the stage table, the --bound rows and the ceiling line.
    import subprocess
    import sys
    from pathlib import Path

    tools = Path(__file__).resolve().parents[2] / "tools"
    args = ["profile_vsa.py", "--size", "8x8x8", "--sparsity", "0.5", "--heads", "1", "--head-dim", "16", "--bound"]
    result = subprocess.run([sys.executable, *args], cwd=tools, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for row in ("| fine forward |", "| fine backward |", "| dense SDPA forward |", "flash kernel alone, 8 calls of 64 rows"):
        assert row in result.stdout
    ceiling = float(result.stdout.rsplit("forward ceiling with this kernel: ", 1)[1].split("x")[0])
    assert ceiling > 0
