"""VSA in plain PyTorch: the coarse (cube-mean) stage, top-k cube selection, and the block-sparse
fine stage as a custom autograd Function with a chunked, recomputing backward.

Runs on any device; it is the fallback everywhere and, on CPU, the fastest backend (the flex
backend reuses `block_sparse_backward` from here). It never materializes an S x S matrix: the
fine stage walks chunks of query cubes and gathers only their selected key cubes.

A query row's selected keys (K cubes of 64) always fit in one chunk. Both forwards keep the
row log-sum-exp (base 2, as the triton backend's). On CPU the forward runs PyTorch's flash
kernel per chunk of gathered cubes, and the backward walks each row's selected cubes in
blocks, FlashAttention-2 style, with delta = rowsum(dO * O) from the saved output. Elsewhere
the backward takes whole rows at once, P = exp2(S * log2(e) - lse), and dS from dP and P
alone (rowsum(dP * P) = rowsum(dO * O)), so the output is not saved there. Without an lse
(flex's CPU forward keeps none) P is the fused softmax of the recomputed scores.

Layouts follow vsa_tiling's legend: q_bhpd is [B, H, C*64, D] in padded cube order; rows are
query cubes flattened over (B, H), so `*_rtd` is [B*H*C, 64, D] and `kv_cubes_bhck` is
[B, H, C, K] (local cube ids within each (b, h)).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from megadmd.attention.vsa_tiling import CUBE_TOKENS, CubeTiling

# Bytes of all per-chunk buffers of one worker (gathered K/V cubes, score blocks, gradients).
# On CPU 4 MiB: one query cube per chunk at 29k tokens (46 key cubes, D=128; 3 MiB forward,
# 8.3 MiB backward), which measured fastest there (forward 2.12 s against 2.30 s with 2 query
# cubes, backward 6.55 s against 7.22 s with 2), as the buffers stay nearer the core; smaller
# shapes still batch a few query cubes per op. On GPUs one big chunk amortizes launches.
_CHUNK_BYTES = {"cpu": 4 << 20}
_CHUNK_BYTES_DEFAULT = 2 << 30
_LOG2E = math.log2(math.e)
# Key cubes per step of the CPU backward (_key_blocked_backward). At 29k tokens and 0.9
# sparsity (46 cubes per row), best of 6 interleaved rounds: whole rows 6.10 s, blocks of 8
# 5.95 s, 12 4.95 s, 16 4.94 s, 23 4.99 s (medians 7.2, 6.3, 5.8, 5.4, 6.0 s); fewer cubes
# per block pay more per-op overhead, more stream out of cache again.
_KEY_BLOCK_CUBES = 16


def coarse_attention(
    q_bhpd: torch.Tensor, k_bhpd: torch.Tensor, v_bhpd: torch.Tensor, tiling: CubeTiling
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention between cube means. Returns (out_bhcd, scores_bhcc).

    Padded slots are zero, so a sum over the 64 slots divided by the valid count is the mean over
    valid tokens only. Gradients flow by ordinary autograd (the sum broadcasts the gradient to
    padded slots too, but untiling drops those).
    """
    batch, heads, _, dim = q_bhpd.shape
    counts = tiling.cube_sizes.to(q_bhpd.dtype).view(1, 1, -1, 1)

    def cube_mean(x_bhpd: torch.Tensor) -> torch.Tensor:
        return x_bhpd.view(batch, heads, tiling.num_cubes, CUBE_TOKENS, dim).sum(3) / counts

    q_bhcd, k_bhcd, v_bhcd = cube_mean(q_bhpd), cube_mean(k_bhpd), cube_mean(v_bhpd)
    scores_bhcc = torch.matmul(q_bhcd, k_bhcd.transpose(-1, -2)) / math.sqrt(dim)
    out_bhcd = torch.matmul(torch.softmax(scores_bhcc, dim=-1), v_bhcd)
    return out_bhcd, scores_bhcc


@torch.no_grad()
def select_key_cubes(scores_bhcc: torch.Tensor, topk: int) -> torch.Tensor:
    """The topk key cubes with the largest pre-softmax coarse score per query cube, ascending.

    Non-differentiable by design (VSA section 3.3). Ascending order makes the fine stage read
    key memory front to back.
    """
    if topk >= scores_bhcc.shape[-1]:
        full = torch.arange(scores_bhcc.shape[-1], device=scores_bhcc.device)
        return full.expand(scores_bhcc.shape).contiguous()
    return torch.topk(scores_bhcc, topk, dim=-1, sorted=False).indices.sort(dim=-1).values


def key_bias_ct(tiling: CubeTiling, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive score bias per key slot: 0 for real tokens, -inf for padding; None if no padding."""
    if tiling.all_full:
        return None
    zeros = torch.zeros(tiling.slot_valid_ct.shape, dtype=dtype, device=tiling.slot_valid_ct.device)
    return zeros.masked_fill(~tiling.slot_valid_ct, float("-inf"))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs are computed in fp32: this path is a fallback, not a bf16 kernel.
    return torch.promote_types(dtype, torch.float32)


def _as_rows(x_bhpd: torch.Tensor, work_dtype: torch.dtype) -> torch.Tensor:
    batch, heads, slots, dim = x_bhpd.shape
    num_rows = batch * heads * (slots // CUBE_TOKENS)
    return x_bhpd.to(work_dtype).contiguous().view(num_rows, CUBE_TOKENS, dim)


def _global_cube_rows(kv_cubes_bhck: torch.Tensor) -> torch.Tensor:
    """Local key-cube ids [B, H, C, K] -> row ids into the [B*H*C, 64, D] view, as [B*H*C, K]."""
    batch, heads, num_cubes, topk = kv_cubes_bhck.shape
    base = torch.arange(batch * heads, device=kv_cubes_bhck.device).view(batch, heads, 1, 1) * num_cubes
    return (kv_cubes_bhck + base).view(-1, topk)


# PyTorch's own CPU flash-attention kernel (what SDPA calls on CPU), with its log-sum-exp.
_CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _flash_on(device: torch.device) -> bool:
    """Whether the forward runs _CPU_FLASH per chunk: on CPU (its backward kernel measured
    slower than the chunked one below: 9.8 s against 6.8 s at 29k tokens)."""
    return device.type == "cpu"


def _softmax_into(scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    # One fused, row-parallel kernel (max, exp-sum, normalize per cache-resident row) into a
    # reused buffer, instead of four separate elementwise passes.
    return torch.ops.aten._softmax.out(scores, -1, False, out=probs)


class _ChunkPlan:
    """Shared set-up of the chunked fine-stage passes: row views, key-cube rows, chunk size."""

    def __init__(self, q_bhpd, kv_cubes_bhck, key_bias, key_buffers: int, score_buffers: int, block_cubes=None):
        batch, heads, slots, dim = q_bhpd.shape
        self.shape = (batch, heads, slots, dim)
        self.work_dtype = _work_dtype(q_bhpd.dtype)
        self.topk = kv_cubes_bhck.shape[-1]
        # Buffers hold one block of key cubes per query row: all topk, or block_cubes of them.
        self.block_cubes = min(self.topk, block_cubes or self.topk)
        self.keys = self.block_cubes * CUBE_TOKENS
        self.scale = 1.0 / math.sqrt(dim)
        self.rows_kv = _global_cube_rows(kv_cubes_bhck)
        self.local_kv = kv_cubes_bhck.reshape(-1, self.topk)
        self.key_bias = key_bias
        self.num_rows = batch * heads * (slots // CUBE_TOKENS)
        itemsize = torch.empty((), dtype=self.work_dtype).element_size()
        row_bytes = itemsize * self.keys * (key_buffers * dim + score_buffers * CUBE_TOKENS)
        budget = _CHUNK_BYTES.get(q_bhpd.device.type, _CHUNK_BYTES_DEFAULT)
        self.step = min(self.num_rows, max(1, budget // row_bytes))

    def rows(self, x_bhpd: torch.Tensor) -> torch.Tensor:
        return _as_rows(x_bhpd, self.work_dtype)

    def chunks(self) -> list[tuple[int, int, torch.Tensor]]:
        """(start, stop, key-cube row ids of the chunk flattened) for every chunk of query rows."""
        starts = range(0, self.num_rows, self.step)
        bounds = [(start, min(start + self.step, self.num_rows)) for start in starts]
        return [(start, stop, self.rows_kv[start:stop].reshape(-1)) for start, stop in bounds]

    def key_buffer(self, like: torch.Tensor) -> torch.Tensor:
        return like.new_empty(self.step * self.topk, CUBE_TOKENS, like.shape[-1])

    def score_buffer(self, like: torch.Tensor) -> torch.Tensor:
        return like.new_empty(self.step, CUBE_TOKENS, self.keys)

    @staticmethod
    def score_view(buf: torch.Tensor, rows: int, keys: int) -> torch.Tensor:
        """The front of a score buffer as a contiguous [rows, 64, keys] block."""
        return buf.view(-1)[: rows * CUBE_TOKENS * keys].view(rows, CUBE_TOKENS, keys)

    def gather(self, x_rtd, idx, buf, rows: int | None = None):
        """The cubes `idx` of x_rtd into buf, as [rows, cubes per row * 64, D] (rows defaults
        to a whole selection per row)."""
        rows = rows or idx.numel() // self.topk
        return torch.index_select(x_rtd, 0, idx, out=buf[: idx.numel()]).view(rows, -1, x_rtd.shape[-1])

    def scores(self, q_chunk, k_sel, start, stop, buf, base2: bool, shift=None, cubes=slice(None)):
        """Scaled scores of the chunk, in log base 2 (times log2(e)) if base2: exp2 of those is
        the same softmax numerator, and exp2 ran at about twice exp's speed on CPU (AVX2).
        `shift` ([n, 64, 1]) is added to every row in the same matmul; `cubes` picks the block
        of each row's selected cubes that k_sel holds (for the padding bias)."""
        # The softmax scale rides on the matmul (alpha); beta=0 ignores the stale buffer.
        out = self.score_view(buf, q_chunk.shape[0], k_sel.shape[1])
        alpha = self.scale * _LOG2E if base2 else self.scale
        if shift is None:
            scores = torch.baddbmm(out, q_chunk, k_sel.transpose(1, 2), beta=0, alpha=alpha, out=out)
        else:
            scores = torch.baddbmm(shift, q_chunk, k_sel.transpose(1, 2), alpha=alpha, out=out)
        if self.key_bias is not None:
            bias = self.key_bias[self.local_kv[start:stop, cubes]]
            scores.add_(bias.view(q_chunk.shape[0], 1, k_sel.shape[1]))
        return scores

    def add_key_grads(self, dscores, q_chunk, dk_buf, idx, dv_sel, dk_rtd, dv_rtd) -> None:
        """dK of the gathered cubes (scale * dS^T Q) into dk_buf; then it and dV are added into
        the worker's accumulators: a key cube's gradient sums over every query cube that
        selected it."""
        dk_sel = dk_buf[: idx.numel()].view_as(dv_sel)
        torch.baddbmm(dk_sel, dscores.transpose(1, 2), q_chunk, beta=0, alpha=self.scale, out=dk_sel)
        dk_rtd.index_add_(0, idx, dk_sel.view(-1, CUBE_TOKENS, dk_sel.shape[-1]))
        dv_rtd.index_add_(0, idx, dv_sel.view(-1, CUBE_TOKENS, dv_sel.shape[-1]))

    def gradients(self, q_bhpd, dq_rtd, states: list) -> tuple[torch.Tensor, ...]:
        """(dq, dk, dv) as [B, H, P, D] in q's dtype; dk and dv are the last two tensors of each
        worker's state, summed over workers (into the first worker's)."""
        dk_rtd, dv_rtd = states[0][-2:]
        for state in states[1:]:
            dk_rtd.add_(state[-2])
            dv_rtd.add_(state[-1])
        return tuple(g.view(self.shape).to(q_bhpd.dtype) for g in (dq_rtd, dk_rtd, dv_rtd))


def _run_chunks(chunks: list, make_state, process, device: torch.device) -> list:
    """Run process(state, chunk) over all chunks; returns the per-worker states.

    On CPU the chunks are shared out to torch.get_num_threads() Python workers, each running
    single-threaded ops on its own buffers (torch ops release the GIL). One OpenMP-parallel op
    per step instead cost a barrier per op, and when another process held a core each barrier
    waited out a scheduler tick: about 10 ms per op, 36 s for one 29k-token forward (6 MiB
    chunks) that takes 1.4 s this way. Workers also keep their chunk in their own core's cache.
    """
    num_workers = min(len(chunks), torch.get_num_threads()) if device.type == "cpu" else 1
    if num_workers <= 1:
        state = make_state()
        for chunk in chunks:
            process(state, chunk)
        return [state]
    pending, lock = iter(chunks), threading.Lock()

    def work():
        torch.set_num_threads(1)  # process-wide; the caller's count is restored below
        with torch.no_grad():  # grad mode is thread-local and a new thread starts with it on
            state = make_state()
            while True:
                with lock:
                    chunk = next(pending, None)
                if chunk is None:
                    return state
                process(state, chunk)

    caller_threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(num_workers, thread_name_prefix="vsa-chunks") as pool:
            futures = [pool.submit(work) for _ in range(num_workers)]
            return [future.result() for future in futures]
    finally:
        torch.set_num_threads(caller_threads)


@torch.no_grad()
def block_sparse_forward(
    q_bhpd: torch.Tensor,
    k_bhpd: torch.Tensor,
    v_bhpd: torch.Tensor,
    kv_cubes_bhck: torch.Tensor,
    key_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine stage forward in padded cube layout: [B, H, P, D] -> (out [B, H, P, D], lse).

    Each query row sees all of its keys inside one chunk. Per chunk, gather the selected key
    and value cubes, then:
    - on CPU, call PyTorch's flash kernel on them. It walks the keys in blocks that stay in L2
      (online softmax), where one 64 x 64K score block does not fit: 2.3 s against 2.9 s for
      the bmm route below, at 29k tokens. Its log-sum-exp (natural log) becomes the base-2
      lse. It comes from a faster, less exact exp than the softmax's; the backward that uses
      it stays within fp32 rounding (see _key_blocked_backward).
    - elsewhere, one bmm for the scores (in log base 2), exp2(S - rowmax) in place, one bmm,
      and the output rows divided by their sums (normalizing the 64 x D output instead of the
      probabilities saves a pass over the scores; the fused softmax measured slower). V is
      gathered after the scores, so that it is still in cache for its bmm. lse is the row
      log-sum-exp of the scaled scores in base 2, [B*H*C, 64, 1] in the work dtype.
    """
    flash = _flash_on(q_bhpd.device)
    plan = _ChunkPlan(q_bhpd, kv_cubes_bhck, key_bias, key_buffers=2, score_buffers=0 if flash else 1)
    q_rtd = plan.rows(q_bhpd)
    k_rtd, v_rtd = plan.rows(k_bhpd), plan.rows(v_bhpd)
    out_rtd = torch.empty_like(q_rtd)
    lse_rt1 = q_rtd.new_empty(plan.num_rows, CUBE_TOKENS, 1)

    def make_state():
        # Reused buffers: fresh multi-MiB allocations per chunk cost page faults that, on CPU,
        # took about as long as the matmuls themselves.
        return [plan.key_buffer(q_rtd) for _ in range(2)] + ([] if flash else [plan.score_buffer(q_rtd)])

    def process_flash(state, chunk):
        start, stop, idx = chunk
        n = stop - start
        k_sel, v_sel = (plan.gather(x, idx, buf).unsqueeze(1) for x, buf in zip((k_rtd, v_rtd), state))
        bias = plan.key_bias
        if bias is not None:  # -inf on padded key slots, broadcast over the query rows
            bias = bias[plan.local_kv[start:stop]].view(n, 1, 1, plan.keys)
        out, lse = _CPU_FLASH(q_rtd[start:stop].unsqueeze(1), k_sel, v_sel, attn_mask=bias, scale=plan.scale)[:2]
        out_rtd[start:stop] = out.squeeze(1)
        torch.mul(lse.view(n, CUBE_TOKENS, 1), _LOG2E, out=lse_rt1[start:stop])  # natural log -> base 2

    def process(state, chunk):
        k_buf, v_buf, s_buf = state
        start, stop, idx = chunk
        scores = plan.scores(q_rtd[start:stop], plan.gather(k_rtd, idx, k_buf), start, stop, s_buf, True)
        row_max = scores.amax(-1, keepdim=True)
        probs = scores.sub_(row_max).exp2_()  # unnormalized
        row_sum = probs.sum(-1, keepdim=True)
        out_chunk = torch.bmm(probs, plan.gather(v_rtd, idx, v_buf), out=out_rtd[start:stop])
        out_chunk.div_(row_sum)
        torch.add(row_max, row_sum.log2_(), out=lse_rt1[start:stop])

    _run_chunks(plan.chunks(), make_state, process_flash if flash else process, q_rtd.device)
    return out_rtd.view(plan.shape).to(q_bhpd.dtype), lse_rt1


@torch.no_grad()
def block_sparse_backward(
    q_bhpd: torch.Tensor,
    k_bhpd: torch.Tensor,
    v_bhpd: torch.Tensor,
    grad_out_bhpd: torch.Tensor,
    kv_cubes_bhck: torch.Tensor,
    key_bias: torch.Tensor | None,
    lse_rt1: torch.Tensor | None = None,
    out_rtd: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fine stage backward by recomputation, chunk by chunk. Returns (dq, dk, dv) as [B, H, P, D].

    Given the forward's output rows `out_rtd` as well as `lse_rt1` (the CPU forward keeps both),
    this is `_key_blocked_backward`; what follows is the whole-row backward used otherwise.

    With P the recomputed row softmax: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)),
    dQ = scale * dS K, dK = scale * dS^T Q. rowsum(dP * P) equals the usual rowsum(dO * O), so
    the output is not needed; `_softmax_backward_data` computes dS in one fused pass. P is
    exp2(S * log2(e) - lse) from the forward's base-2 row log-sum-exp `lse_rt1` (one pass over
    the scores instead of the softmax's three); without it (the CPU forwards, flex's and ours,
    keep none) P is the fused softmax of the recomputed scores. dK and dV of a key cube collect
    contributions from every query cube that selected it, hence index_add_, into one accumulator
    per worker (summed at the end) so that workers never add into the same rows at once.
    """
    if out_rtd is not None:
        return _key_blocked_backward(q_bhpd, k_bhpd, v_bhpd, grad_out_bhpd, kv_cubes_bhck, key_bias, lse_rt1, out_rtd)
    plan = _ChunkPlan(q_bhpd, kv_cubes_bhck, key_bias, key_buffers=4, score_buffers=3)
    q_rtd = plan.rows(q_bhpd)
    k_rtd, v_rtd, do_rtd = plan.rows(k_bhpd), plan.rows(v_bhpd), plan.rows(grad_out_bhpd)
    dq_rtd = torch.empty_like(q_rtd)

    def make_state():
        buffers = [plan.key_buffer(q_rtd) for _ in range(4)]
        buffers += [plan.score_buffer(q_rtd) for _ in range(3)]
        return buffers + [torch.zeros_like(k_rtd), torch.zeros_like(v_rtd)]

    def process(state, chunk):
        k_buf, v_buf, dk_buf, dv_buf, s_buf, p_buf, dp_buf, dk_rtd, dv_rtd = state
        start, stop, idx = chunk
        k_sel = plan.gather(k_rtd, idx, k_buf)
        q_chunk, do_chunk = q_rtd[start:stop], do_rtd[start:stop]
        scores = plan.scores(q_chunk, k_sel, start, stop, s_buf, lse_rt1 is not None)
        if lse_rt1 is None:
            probs = _softmax_into(scores, p_buf[: stop - start])
        else:
            probs = scores.sub_(lse_rt1[start:stop]).exp2_()
        dv_sel = torch.bmm(probs.transpose(1, 2), do_chunk, out=dv_buf[: idx.numel()].view_as(k_sel))
        v_sel = plan.gather(v_rtd, idx, v_buf)  # gathered late: still in cache for its bmm
        dprobs = torch.bmm(do_chunk, v_sel.transpose(1, 2), out=dp_buf[: stop - start])
        free_buf = s_buf if lse_rt1 is None else p_buf  # the one not holding probs
        dscores = torch.ops.aten._softmax_backward_data.out(
            dprobs, probs, -1, probs.dtype, grad_input=free_buf[: stop - start]
        )
        dq_chunk = dq_rtd[start:stop]
        torch.baddbmm(dq_chunk, dscores, k_sel, beta=0, alpha=plan.scale, out=dq_chunk)
        plan.add_key_grads(dscores, q_chunk, dk_buf, idx, dv_sel, dk_rtd, dv_rtd)

    states = _run_chunks(plan.chunks(), make_state, process, q_rtd.device)
    return plan.gradients(q_bhpd, dq_rtd, states)


@torch.no_grad()
def _key_blocked_backward(q_bhpd, k_bhpd, v_bhpd, grad_out_bhpd, kv_cubes_bhck, key_bias, lse_rt1, out_rtd):
    """FlashAttention-2-style fine-stage backward over blocks of a row's selected key cubes.

    With the row log-sum-exp L (base 2) and delta = rowsum(dO * O) known up front, one key
    block's P = exp2(S * log2(e) - L) and dS = P * (dO V^T - delta) need nothing from the
    row's other blocks. So each step touches _KEY_BLOCK_CUBES cubes: gathered K and V, their
    dK and dV, and two 64 x 1024 score blocks, about 2.6 MiB that stay near the core,
    where the whole-row backward streams about 8 MiB per query cube through L3 and ran its
    five matmuls at half their in-cache speed (29k tokens, 0.9 sparsity: 20% faster, see
    _KEY_BLOCK_CUBES). L is subtracted and delta taken out inside the matmuls (baddbmm's
    broadcast input). L comes from the flash kernel's log-sum-exp and delta from the saved
    output, as in FlashAttention. Against an fp64 reference the fp32 gradients are 1e-6 to 3e-6
    of their largest entry off (the whole-row softmax recompute: 1.5e-6 at 29k tokens); in
    fp64 they match dense attention to 1e-10 (tests/unit/test_vsa.py).
    """
    plan = _ChunkPlan(q_bhpd, kv_cubes_bhck, key_bias, key_buffers=4, score_buffers=2, block_cubes=_KEY_BLOCK_CUBES)
    q_rtd = plan.rows(q_bhpd)
    k_rtd, v_rtd, do_rtd = plan.rows(k_bhpd), plan.rows(v_bhpd), plan.rows(grad_out_bhpd)
    dq_rtd = torch.empty_like(q_rtd)

    def make_state():
        buffers = [plan.key_buffer(q_rtd) for _ in range(4)] + [plan.score_buffer(q_rtd) for _ in range(2)]
        return buffers + [torch.zeros_like(k_rtd), torch.zeros_like(v_rtd)]

    def process(state, chunk):
        k_buf, v_buf, dk_buf, dv_buf, s_buf, dp_buf, dk_rtd, dv_rtd = state
        start, stop, _ = chunk
        n = stop - start
        q_chunk, do_chunk, dq_chunk = q_rtd[start:stop], do_rtd[start:stop], dq_rtd[start:stop]
        neg_lse = lse_rt1[start:stop].neg()
        neg_delta = (do_chunk * out_rtd[start:stop]).sum(-1, keepdim=True).neg_()
        for first in range(0, plan.topk, plan.block_cubes):
            cubes = slice(first, first + plan.block_cubes)
            idx = plan.rows_kv[start:stop, cubes].reshape(-1)
            k_sel = plan.gather(k_rtd, idx, k_buf, n)
            probs = plan.scores(q_chunk, k_sel, start, stop, s_buf, True, neg_lse, cubes).exp2_()
            dv_sel = torch.bmm(probs.transpose(1, 2), do_chunk, out=dv_buf[: idx.numel()].view_as(k_sel))
            v_sel = plan.gather(v_rtd, idx, v_buf, n)  # gathered late: still in cache for its bmm
            dp_out = plan.score_view(dp_buf, n, k_sel.shape[1])
            dscores = torch.baddbmm(neg_delta, do_chunk, v_sel.transpose(1, 2), out=dp_out).mul_(probs)
            torch.baddbmm(dq_chunk, dscores, k_sel, beta=0 if first == 0 else 1, alpha=plan.scale, out=dq_chunk)
            plan.add_key_grads(dscores, q_chunk, dk_buf, idx, dv_sel, dk_rtd, dv_rtd)

    states = _run_chunks(plan.chunks(), make_state, process, q_rtd.device)
    return plan.gradients(q_bhpd, dq_rtd, states)


class BlockSparseAttention(torch.autograd.Function):
    """Fine stage: each query cube attends over the tokens of its selected key cubes only.

    Saves q, k, v, the selection, the row log-sum-exp (4 bytes per padded token per head in
    fp32) and, on CPU, the output in padded cube layout (one more activation of q's size, for
    the key-blocked backward's delta); the backward recomputes scores chunk by chunk.
    """

    @staticmethod
    def forward(ctx, q_bhpd, k_bhpd, v_bhpd, kv_cubes_bhck, key_bias):
        out_bhpd, lse_rt1 = block_sparse_forward(q_bhpd, k_bhpd, v_bhpd, kv_cubes_bhck, key_bias)
        # On CPU the backward is _key_blocked_backward, which takes delta from the output.
        out_saved = out_bhpd if _flash_on(q_bhpd.device) else None
        ctx.save_for_backward(q_bhpd, k_bhpd, v_bhpd, kv_cubes_bhck, lse_rt1, out_saved)
        ctx.key_bias = key_bias
        return out_bhpd

    @staticmethod
    def backward(ctx, grad_out_bhpd):
        q_bhpd, k_bhpd, v_bhpd, kv_cubes_bhck, lse_rt1, out_bhpd = ctx.saved_tensors
        out_rtd = None if out_bhpd is None else _as_rows(out_bhpd, _work_dtype(out_bhpd.dtype))
        grads = block_sparse_backward(
            q_bhpd, k_bhpd, v_bhpd, grad_out_bhpd, kv_cubes_bhck, ctx.key_bias, lse_rt1, out_rtd
        )
        return (*grads, None, None)


def block_sparse_attention(
    q_bhpd: torch.Tensor,
    k_bhpd: torch.Tensor,
    v_bhpd: torch.Tensor,
    kv_cubes_bhck: torch.Tensor,
    tiling: CubeTiling,
) -> torch.Tensor:
    """Differentiable fine stage in padded cube layout; padded key slots are masked out."""
    bias = key_bias_ct(tiling, _work_dtype(q_bhpd.dtype))
    return BlockSparseAttention.apply(q_bhpd, k_bhpd, v_bhpd, kv_cubes_bhck, bias)
