"""VSA fine stage in Triton: block-sparse FlashAttention-2 over 64-token cubes, forward and backward.

Owns the three kernels (forward; dQ; dK and dV) and the autograd Function around them. The
caller (vsa.py) tiles, runs the coarse stage and picks the key cubes; this module attends each
query cube over the tokens of its selected key cubes, exactly as vsa_torch does, but in fused
kernels that never gather K/V or materialize a score block in memory.

- Forward: one program per (query cube, batch x head). It walks the query cube's K selected key
  cubes straight from the top-k index tensor, with an online softmax in fp32 (FlashAttention-2),
  and writes the output and the row log-sum-exp (base 2, of the scaled scores).
- Backward recomputes the probabilities from that log-sum-exp (no S x S state is kept):
  the dQ kernel walks each query cube's selected key cubes again; the dK/dV kernel walks, for
  each key cube, the query cubes that selected it (the inverse of the selection, built once per
  backward with a stable sort). Both are deterministic: no atomics.
- Partial cubes at grid edges: padded key slots are masked with the cube's valid-token count;
  padded query slots are computed and dropped by untiling (their dO is zero).
- Precision: bf16/fp16 inputs are multiplied on tensor cores with fp32 accumulation, and the
  probabilities are rounded to the input dtype before the P @ V and dS @ K/Q products, as
  FlashAttention does; fp32 inputs use fp32 products (TF32 only when
  torch.backends.cuda.matmul.allow_tf32 is set, as torch's own matmuls and flex do).

Layouts follow vsa_tiling's legend: q_bhpd is [B, H, C*64, D] in padded cube order, seen here as
[B*H, P, D] rows; kv_cubes_bhck is [B, H, C, K] local key-cube ids.

This module imports triton at import time, so vsa.py imports it only when the triton backend is
asked for. On CPU tensors it runs only under Triton's interpreter (TRITON_INTERPRET=1), which is
how the tests check it; the interpreter must be on before this module is first imported, because
triton.jit reads it when the kernels are defined.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from megadmd.attention.vsa_tiling import CUBE_TOKENS, CubeTiling

_LOG2E = 1.4426950408889634

# Whether the kernels below were defined for Triton's CPU interpreter (read by triton.jit at
# definition time, so fixed for this module's life).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Index arithmetic below is int64 on purpose: row offsets of a [B*H, P, D] tensor can pass 2^31,
# and Triton's interpreter checks every int32 multiply and add for overflow, which made it about
# five times slower. The per-program tile offsets (`tile`) are formed once, outside the loops.
#
# UPCAST works around Triton's interpreter, whose tl.dot multiplies bf16 operands as their raw
# uint16 storage (triton 3.9). Under it, tiles are loaded as fp32, which gives the same products
# a GPU tensor core forms from bf16/fp16 (exact in fp32) with the same fp32 accumulation; the
# probabilities are still rounded to the input dtype first (`.to(ELEM).to(v.dtype)`, where the
# second cast is a no-op on a GPU).


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KV_IDX, CUBE_SIZES, scale_log2, num_cubes, topk,
    HEAD_DIM: tl.constexpr, CUBE: tl.constexpr, HAS_PAD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    ELEM: tl.constexpr = Q.dtype.element_ty
    q_cube = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    offs_t = tl.arange(0, CUBE)
    tile = offs_t[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    head_rows = bh * num_cubes * CUBE  # first row of this (batch, head) in [B*H, P, D]
    q_tile = (head_rows + q_cube * CUBE) * HEAD_DIM
    q = tl.load(Q + q_tile + tile)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([CUBE], float("-inf"), tl.float32)
    l_i = tl.zeros([CUBE], tl.float32)
    acc = tl.zeros([CUBE, HEAD_DIM], tl.float32)
    kv_idx = KV_IDX + (bh * num_cubes + q_cube) * topk
    for j in range(0, topk):
        kv_cube = tl.load(kv_idx + j).to(tl.int64)
        kv_tile = (head_rows + kv_cube * CUBE) * HEAD_DIM
        k = tl.load(K + kv_tile + tile)
        v = tl.load(V + kv_tile + tile)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        if HAS_PAD:
            s = tl.where(offs_t[None, :] < tl.load(CUBE_SIZES + kv_cube), s, float("-inf"))
        # Every selected cube holds at least one real key, so m_new is finite from the first
        # cube on and exp2(m_i - m_new) never sees -inf - -inf.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(ELEM).to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    tl.store(O + q_tile + tile, (acc / l_i[:, None]).to(ELEM))
    tl.store(LSE + head_rows + q_cube * CUBE + offs_t, m_i + tl.log2(l_i))


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KV_IDX, CUBE_SIZES, scale, scale_log2, num_cubes, topk,
    HEAD_DIM: tl.constexpr, CUBE: tl.constexpr, HAS_PAD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    ELEM: tl.constexpr = Q.dtype.element_ty
    q_cube = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    offs_t = tl.arange(0, CUBE)
    tile = offs_t[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    head_rows = bh * num_cubes * CUBE
    q_tile = (head_rows + q_cube * CUBE) * HEAD_DIM
    q = tl.load(Q + q_tile + tile)
    do = tl.load(DO + q_tile + tile)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + head_rows + q_cube * CUBE + offs_t)
    delta = tl.load(DELTA + head_rows + q_cube * CUBE + offs_t)
    dq = tl.zeros([CUBE, HEAD_DIM], tl.float32)
    kv_idx = KV_IDX + (bh * num_cubes + q_cube) * topk
    for j in range(0, topk):
        kv_cube = tl.load(kv_idx + j).to(tl.int64)
        kv_tile = (head_rows + kv_cube * CUBE) * HEAD_DIM
        k = tl.load(K + kv_tile + tile)
        v = tl.load(V + kv_tile + tile)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2 - lse[:, None])
        if HAS_PAD:
            p = tl.where(offs_t[None, :] < tl.load(CUBE_SIZES + kv_cube), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(ELEM).to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + q_tile + tile, (dq * scale).to(ELEM))


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, Q_OFFSETS, Q_CUBES, CUBE_SIZES, scale, scale_log2, num_cubes,
    HEAD_DIM: tl.constexpr, CUBE: tl.constexpr, HAS_PAD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    ELEM: tl.constexpr = Q.dtype.element_ty
    kv_cube = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    offs_t = tl.arange(0, CUBE)
    tile = offs_t[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    head_rows = bh * num_cubes * CUBE
    kv_tile = (head_rows + kv_cube * CUBE) * HEAD_DIM
    k = tl.load(K + kv_tile + tile)
    v = tl.load(V + kv_tile + tile)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([CUBE, HEAD_DIM], tl.float32)
    dv = tl.zeros([CUBE, HEAD_DIM], tl.float32)
    if HAS_PAD:
        key_valid = offs_t < tl.load(CUBE_SIZES + kv_cube)
    # The query cubes that selected this key cube: Q_CUBES[start:stop], ascending.
    start = tl.load(Q_OFFSETS + bh * num_cubes + kv_cube)
    stop = tl.load(Q_OFFSETS + bh * num_cubes + kv_cube + 1)
    for i in range(start, stop):
        q_cube = tl.load(Q_CUBES + i).to(tl.int64)
        q_tile = (head_rows + q_cube * CUBE) * HEAD_DIM
        q = tl.load(Q + q_tile + tile)
        do = tl.load(DO + q_tile + tile)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + head_rows + q_cube * CUBE + offs_t)
        delta = tl.load(DELTA + head_rows + q_cube * CUBE + offs_t)
        # Transposed blocks ([keys, queries]) so that dK and dV come out of plain products.
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2 - lse[None, :])
        if HAS_PAD:
            p_t = tl.where(key_valid[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(ELEM).to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(ELEM).to(q.dtype), q, input_precision=PRECISION)
    tl.store(DK + kv_tile + tile, (dk * scale).to(ELEM))
    tl.store(DV + kv_tile + tile, dv.to(ELEM))


# Launch shapes. Not tuned on a GPU yet (no GPU in the session that wrote this): 4 warps for the
# forward and the dQ pass (one 64 x D fp32 accumulator), 8 for dK/dV at D > 64 (two of them).
# fp32 inputs double the shared memory per stage, so they get one stage fewer.
def _launch_options(kernel: str, head_dim: int, dtype: torch.dtype) -> dict:
    if INTERPRETED:
        return {}
    warps = 8 if kernel == "dkdv" and head_dim > 64 else 4
    stages = 2 if dtype == torch.float32 else 3
    return {"num_warps": warps, "num_stages": stages}


MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reason(q_bhpd: torch.Tensor) -> str | None:
    """None if these kernels take q's dtype, head dim and device, else why not."""
    if q_bhpd.dtype not in _DTYPES:
        return f"the triton VSA backend takes fp16, bf16 or fp32, got {q_bhpd.dtype}"
    if q_bhpd.shape[-1] > MAX_HEAD_DIM:
        return f"the triton VSA backend takes head_dim <= {MAX_HEAD_DIM}, got {q_bhpd.shape[-1]}"
    if q_bhpd.device.type == "cpu" and not INTERPRETED:
        return "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before megadmd loads them"
    if q_bhpd.device.type not in ("cpu", "cuda"):
        return f"the triton VSA backend runs on cuda (or cpu under the interpreter), not {q_bhpd.device.type}"
    return None


def kernel_head_dim(dim: int) -> int:
    """The head dim the kernels run at: a power of two >= 16 (tl.arange and tl.dot need one).
    Other head dims are zero-padded up to it, which changes no score and no output column."""
    return max(16, triton.next_power_of_2(dim))


class _Launch:
    """What every kernel of one call shares: grid, scale, constexprs, the cube sizes."""

    def __init__(self, q_bhpd: torch.Tensor, tiling: CubeTiling):
        batch, heads, _, dim = q_bhpd.shape
        self.dim, self.kernel_dim = dim, kernel_head_dim(dim)
        self.num_cubes = tiling.num_cubes
        self.grid = (tiling.num_cubes, batch * heads)
        self.scale = 1.0 / math.sqrt(dim)  # of the caller's head dim, not the padded one
        self.cube_sizes = tiling.cube_sizes.to(torch.int32)
        self.dtype = q_bhpd.dtype
        # fp32 follows torch's own TF32 switch; for half inputs the setting changes nothing.
        tf32 = q_bhpd.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
        self.constexprs = dict(
            HEAD_DIM=self.kernel_dim,
            CUBE=CUBE_TOKENS,
            HAS_PAD=not tiling.all_full,
            PRECISION="tf32" if tf32 else "ieee",
            UPCAST=INTERPRETED and q_bhpd.dtype != torch.float32,
        )

    def options(self, kernel: str) -> dict:
        return {**self.constexprs, **_launch_options(kernel, self.kernel_dim, self.dtype)}

    def to_kernel(self, x_bhpd: torch.Tensor) -> torch.Tensor:
        """Contiguous, with the head dim zero-padded to the kernels' size if needed."""
        if self.kernel_dim != self.dim:
            x_bhpd = torch.nn.functional.pad(x_bhpd, (0, self.kernel_dim - self.dim))
        return x_bhpd.contiguous()

    def from_kernel(self, x_bhpd: torch.Tensor) -> torch.Tensor:
        return x_bhpd[..., : self.dim] if self.kernel_dim != self.dim else x_bhpd


def _inverse_selection(kv_idx_bhck: torch.Tensor, num_cubes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every (batch x head, key cube), the query cubes that selected it.

    Returns (offsets [B*H*C + 1] int32, q_cubes [B*H*C*K] int32): key cube g = bh * C + c was
    selected by q_cubes[offsets[g]:offsets[g + 1]], in ascending order (stable sort).
    """
    topk = kv_idx_bhck.shape[-1]
    bh_count = kv_idx_bhck.numel() // (num_cubes * topk)
    device = kv_idx_bhck.device
    head_base = torch.arange(bh_count, device=device).view(-1, 1, 1) * num_cubes
    key_global = (kv_idx_bhck.reshape(bh_count, num_cubes, topk).long() + head_base).reshape(-1)
    q_cube = torch.arange(num_cubes, device=device, dtype=torch.int32).view(1, -1, 1)
    order = torch.argsort(key_global, stable=True)
    q_cubes = q_cube.expand(bh_count, num_cubes, topk).reshape(-1)[order]
    offsets = torch.zeros(bh_count * num_cubes + 1, dtype=torch.int32, device=device)
    offsets[1:] = torch.cumsum(torch.bincount(key_global, minlength=bh_count * num_cubes), 0)
    return offsets, q_cubes


def triton_block_sparse_forward(q, k, v, kv_idx_bhck, launch: _Launch):
    """(out, lse) from kernel-layout q, k, v ([B, H, P, D'] contiguous): out in the input dtype,
    lse [B*H, P] fp32, base 2, of the scaled scores."""
    out = torch.empty_like(q)
    lse = torch.empty(launch.grid[1], q.shape[2], dtype=torch.float32, device=q.device)
    _fwd_kernel[launch.grid](
        q, k, v, out, lse, kv_idx_bhck, launch.cube_sizes, launch.scale * _LOG2E,
        launch.num_cubes, kv_idx_bhck.shape[-1], **launch.options("fwd"),
    )
    return out, lse


def triton_block_sparse_backward(q, k, v, out, lse, grad_out, kv_idx_bhck, launch: _Launch):
    """(dq, dk, dv) in kernel layout and the input dtype, recomputed from the saved lse."""
    delta = (grad_out.float() * out.float()).sum(-1).view(launch.grid[1], -1)  # rowsum(dO * O)
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    common = dict(scale=launch.scale, scale_log2=launch.scale * _LOG2E, num_cubes=launch.num_cubes)
    _bwd_dq_kernel[launch.grid](
        q, k, v, grad_out, dq, lse, delta, kv_idx_bhck, launch.cube_sizes,
        topk=kv_idx_bhck.shape[-1], **common, **launch.options("dq"),
    )
    offsets, q_cubes = _inverse_selection(kv_idx_bhck, launch.num_cubes)
    _bwd_dkdv_kernel[launch.grid](
        q, k, v, grad_out, dk, dv, lse, delta, offsets, q_cubes, launch.cube_sizes,
        **common, **launch.options("dkdv"),
    )
    return dq, dk, dv


class TritonBlockSparseAttention(torch.autograd.Function):
    """Fine stage in Triton. Saves q, k, v, the output, the log-sum-exp and the selection."""

    @staticmethod
    def forward(ctx, q_bhpd, k_bhpd, v_bhpd, kv_cubes_bhck, tiling):
        launch = _Launch(q_bhpd, tiling)
        q, k, v = (launch.to_kernel(x) for x in (q_bhpd, k_bhpd, v_bhpd))
        kv_idx = kv_cubes_bhck.to(torch.int32).contiguous()
        out, lse = triton_block_sparse_forward(q, k, v, kv_idx, launch)
        ctx.save_for_backward(q, k, v, out, lse, kv_idx)
        ctx.launch = launch
        return launch.from_kernel(out)

    @staticmethod
    def backward(ctx, grad_out_bhpd):
        q, k, v, out, lse, kv_idx = ctx.saved_tensors
        launch = ctx.launch
        grad_out = launch.to_kernel(grad_out_bhpd.to(launch.dtype))
        grads = triton_block_sparse_backward(q, k, v, out, lse, grad_out, kv_idx, launch)
        return (*(launch.from_kernel(g) for g in grads), None, None)


def triton_block_sparse_attention(
    q_bhpd: torch.Tensor,
    k_bhpd: torch.Tensor,
    v_bhpd: torch.Tensor,
    kv_cubes_bhck: torch.Tensor,
    tiling: CubeTiling,
) -> torch.Tensor:
    """Differentiable fine stage in Triton (same contract as vsa_torch.block_sparse_attention)."""
    reason = unsupported_reason(q_bhpd)
    if reason is not None:
        raise RuntimeError(reason)
    return TritonBlockSparseAttention.apply(q_bhpd, k_bhpd, v_bhpd, kv_cubes_bhck, tiling)
