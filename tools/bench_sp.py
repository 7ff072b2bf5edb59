"""Sequence-parallel scaling of a full DMD iteration: sp=1 (1 process) against sp=N (N processes).

Each process runs with one thread, so sp=2 uses twice the cores of sp=1. One iteration is both
phases (generator_update_interval=1): generator forward+backward with the teacher's CFG pair and
the fake score's forward, then a fresh generator sample and the fake score's forward+backward.
It reports seconds per iteration for one sample, the scaling efficiency
``T(sp=1) / (N * T(sp=N))``, and the share of the iteration spent inside the Ulysses
all-to-alls (measured by timing ``megadmd.parallel.ulysses._a2a``; this includes waiting for the
slower rank).

    python tools/bench_sp.py --grid 8,32,32 --iters 2
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from benchlib import free_port, timed_iterations

def bench_config(heads: int, head_dim: int, layers: int) -> dict:
    return dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                in_channels=16, out_channels=16, text_dim=64, freq_dim=64, ffn_dim=4 * heads * head_dim,
                num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                rope_max_seq_len=1024)


def _rank_main(rank: int, world: int, port: int, model_dir: str, data_dir: str, iters: int, warmup: int,
               out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from megadmd.config import resolve
    from megadmd.monitoring.console import setup_console
    from megadmd.parallel import ulysses
    from megadmd.runner import build_trainer

    setup_console(rank)  # a spawned rank: the CLI's warning filters and log lines

    spent = {"a2a": 0.0}
    original = ulysses._a2a

    def timed(x, group):
        t0 = time.perf_counter()
        out = original(x, group)
        spent["a2a"] += time.perf_counter() - t0
        return out

    ulysses._a2a = timed
    t = build_trainer(resolve(overrides=[
        f"model.teacher_path={model_dir}", f"data.path={data_dir}", f"output_dir={Path(data_dir).parent / 'out'}",
        f"parallel.sp_size={world}", "train.micro_batch_size=1", "dmd.generator_update_interval=1",
        "logging.tensorboard=false", "logging.interval_steps=1000000", "train.max_steps=1000"]))
    comm: list[float] = []
    times = timed_iterations(t, iters, warmup, before=lambda: spent.update(a2a=0.0),
                             after=lambda: comm.append(spent["a2a"]))
    if rank == 0:
        Path(out_file).write_text(json.dumps({"times": times, "a2a": comm}))


def run(world: int, model_dir: str, data_dir: str, iters: int, warmup: int) -> dict:
    import torch.multiprocessing as mp

    out = Path(data_dir).parent / f"sp{world}.json"
    mp.spawn(_rank_main, args=(world, free_port(), model_dir, data_dir, iters, warmup, str(out)), nprocs=world)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="8,32,32", help="post-patchify F,H,W (tokens = F*H*W)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--sp", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    f, h, w = (int(x) for x in args.grid.split(","))
    from megadmd.data.make import write_random_dataset
    from megadmd.models import build_wan

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data_dir = Path(tmp) / "model", Path(tmp) / "data"
        build_wan(bench_config(args.heads, args.head_dim, args.layers)).save_pretrained(str(model_dir))
        write_random_dataset(data_dir, num_samples=4, latent_shape=[16, f, 2 * h, 2 * w], text_len=32,
                             text_dim=64)
        res = {n: run(n, str(model_dir), str(data_dir), args.iters, args.warmup) for n in (1, args.sp)}
    t1 = min(res[1]["times"])
    tn = min(res[args.sp]["times"])
    share = sum(res[args.sp]["a2a"]) / sum(res[args.sp]["times"])
    print(f"tokens {f * h * w} ({f}x{h}x{w}), {args.layers} layers, {args.heads} heads x {args.head_dim}, "
          f"1 thread per process, best of {args.iters} iterations after {args.warmup} warm-up")
    print("| layout | processes | s / iteration (1 sample) | all-to-all share | scaling efficiency |")
    print("|---|---|---|---|---|")
    print(f"| sp=1 | 1 | {t1:.2f} | - | 1.00 |")
    print(f"| sp={args.sp} | {args.sp} | {tn:.2f} | {share:.1%} | {t1 / (args.sp * tn):.2f} |")


if __name__ == "__main__":
    main()
