"""Benchmark: dense SDPA against Video Sparse Attention, forward and forward+backward.

Standalone script (the package never imports it). Each VSA time is one full
`video_sparse_attention` call: tiling, coarse stage, top-k selection, fine stage, gate and
untiling. Dense is `F.scaled_dot_product_attention` on the same [B, S, H, D] tensors viewed as
[B, H, S, D], the way diffusers' Wan attention calls it.

The machine this was written on is shared and noisy, so the configurations are interleaved:
every round times dense and each VSA configuration once, and the table reports the best round
per configuration. Warm-up rounds (which include torch.compile for flex) are not counted.

On a CPU shared with other busy processes, `OMP_NUM_THREADS=1 ... --clock cpu` gives ratios that
do not depend on how often this process was descheduled.

Example:
  python tools/bench_attention.py --sizes 29k --sparsities 0.9 --backends torch,flex
  python tools/bench_attention.py --device cuda --dtype bfloat16 --heads 12
  TRITON_INTERPRET=1 python tools/bench_attention.py --sizes 5x6x7 --heads 2 --head-dim 16  # + triton, on CPU
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megadmd.attention.vsa import VSA_BACKENDS, resolve_vsa_backend, video_sparse_attention, vsa_topk
from megadmd.attention.vsa_tiling import cube_tiling

NAMED_GRIDS = {"4k": (16, 16, 16), "16k": (16, 32, 32), "29k": (20, 28, 52), "32k": (21, 30, 52)}


@dataclass
class Case:
    label: str  # "dense" or the VSA backend name
    sparsity: float | None
    best_s: float = math.inf
    first_s: float = math.nan


def parse_grid(text: str) -> tuple[int, int, int]:
    if text in NAMED_GRIDS:
        return NAMED_GRIDS[text]
    dims = tuple(int(n) for n in text.lower().split("x"))
    if len(dims) != 3:
        raise argparse.ArgumentTypeError(f"grid must be a name {list(NAMED_GRIDS)} or FxHxW, got {text}")
    return dims


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--sizes", default="4k,16k,29k", help="comma list of 4k|16k|29k|32k or FxHxW grids")
    parser.add_argument("--sparsities", default="0.5,0.8,0.9")
    parser.add_argument(
        "--backends", default="available", help=f"comma list from {VSA_BACKENDS}, or 'available'"
    )
    parser.add_argument("--modes", default="fwd,fwdbwd", help="comma list of fwd, fwdbwd")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds; the best is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (compile, caches)")
    parser.add_argument("--skip-dense", action="store_true", help="only VSA rows (no speedup column)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: this process's CPU time (process_time), which on a shared CPU machine does not "
        "count the time spent descheduled; meaningful with OMP_NUM_THREADS=1 on a cpu device",
    )
    parser.add_argument(
        "--check", action="store_true", help="first compare each backend with torch on a small grid"
    )
    return parser.parse_args(argv)


def pick_backends(text: str, device: torch.device) -> list[str]:
    if text != "available":
        names = [name.strip() for name in text.split(",") if name.strip()]
        for name in names:
            resolve_vsa_backend(name, device)  # raises with the reason if it cannot run here
        return names
    available = []
    for name in VSA_BACKENDS:
        try:
            available.append(resolve_vsa_backend(name, device))
        except RuntimeError as err:
            print(f"# skipping backend {name}: {err}")
    return available


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(case: Case, grid, mode: str, tensors, grad_out):
    """A closure running one forward (no grad) or one forward+backward of this case."""
    q, k, v, gate = tensors

    def attend():
        if case.label == "dense":
            out_bhsd = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out_bhsd.transpose(1, 2)
        return video_sparse_attention(q, k, v, gate, grid, case.sparsity, backend=case.label)

    if mode == "fwd":

        def step():
            with torch.no_grad():
                attend()

    else:
        inputs = (q, k, v) if case.label == "dense" else (q, k, v, gate)

        def step():
            torch.autograd.grad(attend(), inputs, grad_out)

    return step


def time_once(step, device: torch.device, clock) -> float:
    synchronize(device)
    start = clock()
    step()
    synchronize(device)
    return clock() - start


def bench_grid(args, grid, mode: str, backends: list[str], device, dtype) -> list[Case]:
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    shape = (args.batch, math.prod(grid), args.heads, args.head_dim)
    tensors = [torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for _ in range(4)]
    for tensor in tensors:
        tensor.requires_grad_(mode == "fwdbwd")
    grad_out = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    cases = [] if args.skip_dense else [Case("dense", None)]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    cases += [Case(backend, s) for backend in backends for s in sparsities]
    steps = [make_step(case, grid, mode, tensors, grad_out) for case in cases]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for round_index in range(args.warmup + args.repeats):
        for case, step in zip(cases, steps):
            elapsed = time_once(step, device, clock)
            if round_index == 0:
                case.first_s = elapsed
            if round_index >= args.warmup:
                case.best_s = min(case.best_s, elapsed)
    return cases


CHECK_GRID = (5, 6, 7)  # non-divisible: partial cubes and padded keys


def check_backends(args, backends: list[str], device, dtype) -> dict[str, dict[str, float]]:
    """How far each backend's output and gradients are from the torch backend's (max abs diff),
    on a small irregular grid at sparsity 0.5: {backend: {"out": .., "dq": .., ..., "dgate": ..}}."""
    grid, sparsity = CHECK_GRID, 0.5
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    shape = (args.batch, math.prod(grid), args.heads, args.head_dim)
    tensors = [torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for _ in range(5)]
    grad_out = tensors.pop()

    def run(backend):
        inputs = [t.detach().requires_grad_() for t in tensors]
        out = video_sparse_attention(*inputs, grid, sparsity, backend=backend)
        return [out, *torch.autograd.grad(out, inputs, grad_out)]

    reference = run("torch")
    names = ("out", "dq", "dk", "dv", "dgate")
    return {
        backend: {n: (got.float() - ref.float()).abs().max().item() for n, got, ref in zip(names, run(backend), reference)}
        for backend in backends
        if backend != "torch"
    }


def format_rows(grid, mode: str, cases: list[Case]) -> list[str]:
    dense_s = next((c.best_s for c in cases if c.label == "dense"), math.nan)
    num_cubes = cube_tiling(grid).num_cubes
    rows = []
    for case in cases:
        if case.sparsity is None:
            sparsity = topk = ideal = "-"
        else:
            sparsity = f"{case.sparsity:.2f}"
            topk = f"{vsa_topk(case.sparsity, num_cubes)}/{num_cubes}"
            ideal = f"{1.0 / max(1.0 - case.sparsity, 1e-9):.1f}x"
        speedup = f"{dense_s / case.best_s:.2f}x" if math.isfinite(dense_s) else "-"
        grid_text = "x".join(map(str, grid))
        rows.append(
            f"| {grid_text} | {math.prod(grid)} | {mode} | {case.label} | {sparsity} | {topk} "
            f"| {case.best_s:.3f} | {case.first_s:.3f} | {speedup} | {ideal} |"
        )
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    backends = pick_backends(args.backends, device)
    grids = [parse_grid(text.strip()) for text in args.sizes.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type}, {torch.get_num_threads()} threads"
    shape = f"B={args.batch} H={args.heads} D={args.head_dim}"
    print(f"# torch {torch.__version__}, {name}, {args.dtype}, {shape}")
    print(f"# best of {args.repeats} interleaved rounds after {args.warmup} warm-up; first_s is round one")
    print(f"# clock: {'process CPU time' if args.clock == 'cpu' else 'wall time'}")
    print("# VSA time = the whole video_sparse_attention call (tiling, coarse, top-k, fine, gate)")
    if args.check:
        for backend, diffs in check_backends(args, backends, device, dtype).items():
            summary = ", ".join(f"{n} {d:.2e}" for n, d in diffs.items())
            print(f"# check {backend} vs torch on {'x'.join(map(str, CHECK_GRID))}, max abs diff: {summary}")
    print("| grid | tokens | mode | backend | sparsity | topk | best_s | first_s | speedup | ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for grid in grids:
        for mode in modes:
            if mode not in ("fwd", "fwdbwd"):
                raise SystemExit(f"unknown mode {mode!r}; use fwd or fwdbwd")
            cases = bench_grid(args, grid, mode, backends, device, dtype)
            print("\n".join(format_rows(grid, mode, cases)), flush=True)


if __name__ == "__main__":
    main()
