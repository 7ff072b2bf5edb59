"""Where a torch-backend VSA call spends its time: tiling, coarse stage, top-k, fine stage
forward and backward, untiling; optionally torch.profiler's op table of the fine backward.

Standalone script (the package never imports it); the speedup against dense is
tools/bench_attention.py's job. Each stage is timed alone, best of --repeats, on the same
inputs, so the parts can be set against the whole call's time.

    OMP_NUM_THREADS=1 python tools/profile_vsa.py --clock cpu              # 29k tokens, 0.9
    OMP_NUM_THREADS=1 python tools/profile_vsa.py --clock cpu --ops        # + the op table
    OMP_NUM_THREADS=1 python tools/profile_vsa.py --clock cpu --bound      # + the forward's ceiling
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from bench_attention import parse_grid
from megadmd.attention.vsa import video_sparse_attention, vsa_topk
from megadmd.attention.vsa_tiling import CUBE_TOKENS, cube_tiling, tile_tokens, untile_tokens
from megadmd.attention.vsa_torch import (
    block_sparse_backward,
    block_sparse_forward,
    coarse_attention,
    key_bias_ct,
    select_key_cubes,
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="29k", help="4k|16k|29k|32k or FxHxW")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    parser.add_argument("--ops", action="store_true", help="torch.profiler's table of the fine backward")
    parser.add_argument("--bound", action="store_true", help="the forward's ceiling: dense SDPA against the flash kernel alone")
    args = parser.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    grid = parse_grid(args.size)
    generator = torch.Generator().manual_seed(0)
    shape = (1, math.prod(grid), args.heads, args.head_dim)
    q, k, v, gate, grad_out = (torch.randn(shape, generator=generator) for _ in range(5))
    tiling = cube_tiling(grid)
    topk = vsa_topk(args.sparsity, tiling.num_cubes)

    def seconds(name, fn):
        """Prints the best time of fn; returns it and fn's last result."""
        best, result = math.inf, None
        for _ in range(args.repeats):
            start = clock()
            result = fn()
            best = min(best, clock() - start)
        print(f"| {name} | {best:.3f} |", flush=True)
        return best, result

    def timed(name, fn):
        return seconds(name, fn)[1]

    print(f"# {torch.__version__}, {torch.get_num_threads()} threads, grid {grid}, sparsity {args.sparsity}, "
          f"top-k {topk}/{tiling.num_cubes}, {args.heads} heads x {args.head_dim}, {args.clock} clock")
    print("| stage | best s |\n|---|---|")
    with torch.no_grad():
        q_p, k_p, v_p = (timed(f"tile {n}", lambda x=x: tile_tokens(x, tiling)) for n, x in zip("qkv", (q, k, v)))
        _, scores = timed("coarse stage", lambda: coarse_attention(q_p, k_p, v_p, tiling))
        selection = timed("top-k selection", lambda: select_key_cubes(scores, topk))
        bias = key_bias_ct(tiling, torch.float32)
        out, lse = timed("fine forward", lambda: block_sparse_forward(q_p, k_p, v_p, selection, bias))
        grad_p = tile_tokens(grad_out, tiling)
        out_rows = out.reshape(-1, CUBE_TOKENS, out.shape[-1])  # as the autograd Function passes it on CPU
        fine_backward = lambda: block_sparse_backward(q_p, k_p, v_p, grad_p, selection, bias, lse, out_rows)  # noqa: E731
        timed("fine backward", fine_backward)
        timed("untile", lambda: untile_tokens(out, tiling))
        timed("whole call, forward", lambda: video_sparse_attention(q, k, v, gate, grid, args.sparsity, backend="torch"))
    if args.bound:
        forward_bound(q, k, v, tiling, topk, seconds)
    if args.ops:
        from torch.profiler import profile

        with profile() as prof:
            fine_backward()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


@torch.no_grad()
def forward_bound(q, k, v, tiling, topk, seconds) -> None:
    """What the CPU forward could reach if gathers and Python cost nothing: dense SDPA against
    the flash kernel alone, called as the fine forward calls it (once per query cube and head,
    64 rows against topk * 64 keys) but on one fixed, cache-hot K/V. Also the kernel's rate per
    64 rows when 192 rows share the keys (where its query tile grows from 32 to 64 rows)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    q_bhsd, k_bhsd, v_bhsd = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    dense_s, _ = seconds("dense SDPA forward", lambda: F.scaled_dot_product_attention(q_bhsd, k_bhsd, v_bhsd))
    heads, dim = q.shape[2], q.shape[3]
    keys = topk * CUBE_TOKENS
    k_sel, v_sel = k_bhsd[:1, :1, :keys].contiguous(), v_bhsd[:1, :1, :keys].contiguous()
    calls = heads * tiling.num_cubes

    def kernel_alone(rows: int) -> None:
        q_rows = q_bhsd[:1, :1, :rows].contiguous()
        for _ in range(calls * CUBE_TOKENS // rows):
            flash(q_rows, k_sel, v_sel, scale=1.0 / math.sqrt(dim))

    kernel_s, _ = seconds(f"flash kernel alone, {calls} calls of 64 rows", lambda: kernel_alone(CUBE_TOKENS))
    seconds("flash kernel alone, the same rows 192 a call", lambda: kernel_alone(3 * CUBE_TOKENS))
    print(f"forward ceiling with this kernel: {dense_s / kernel_s:.2f}x dense")


if __name__ == "__main__":
    main()
