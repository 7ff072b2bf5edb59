"""Seconds per DMD iteration and peak memory per rank for a preset, at 1 and at N processes.

Runs ``megadmd train`` in-process per rank (torch.multiprocessing, gloo on CPU), one thread per
process, at the same global batch, and reports the mean iteration time after warm-up (every
iteration runs both phases: generator_update_interval=1) and each rank's peak resident memory.

    python tools/bench_train.py --preset tiny --processes 1,2 --iters 20
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from benchlib import free_port, peak_rss_gib, timed_iterations


def _rank(rank: int, world: int, port: int, overrides: list, iters: int, warmup: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from megadmd.config import resolve
    from megadmd.monitoring.console import setup_console
    from megadmd.runner import build_trainer

    setup_console(rank)  # a spawned rank: the CLI's warning filters and log lines
    t = build_trainer(resolve(overrides=overrides))
    rss_built = peak_rss_gib()
    times = timed_iterations(t, iters, warmup)
    peak = peak_rss_gib()
    stats = torch.tensor([peak, rss_built], dtype=torch.float64)
    gathered = [torch.zeros_like(stats) for _ in range(world)]
    torch.distributed.all_gather(gathered, stats)
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "peak_gib": [float(g[0]) for g in gathered],
                                         "built_gib": [float(g[1]) for g in gathered]}))


def run(world: int, overrides: list, iters: int, warmup: int, tmp: Path) -> dict:
    import torch.multiprocessing as mp

    out = tmp / f"w{world}.json"
    mp.spawn(_rank, args=(world, free_port(), overrides + [f"output_dir={tmp / f'run{world}'}"], iters, warmup,
                          str(out)), nprocs=world)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (int(x) for x in args.processes.split(",")):
            overrides = [f"preset={args.preset}", f"train.micro_batch_size={args.global_batch // world}",
                         "dmd.generator_update_interval=1", "logging.tensorboard=false",
                         "logging.interval_steps=1000000", "train.max_steps=1000000", *args.overrides]
            res = run(world, overrides, args.iters, args.warmup, Path(tmp))
            t = sum(res["times"]) / len(res["times"])
            rows.append((world, t, args.global_batch / t, res["peak_gib"], res["built_gib"]))
    print(f"preset {args.preset}, global batch {args.global_batch}, both phases every iteration, 1 thread per "
          f"process, mean of {args.iters} iterations after {args.warmup} warm-up")
    print("| processes | s / iteration | samples / s | peak RSS per rank (GiB) | RSS after build (GiB) |")
    print("|---|---|---|---|---|")
    for world, t, sps, peak, built in rows:
        print(f"| {world} | {t:.3f} | {sps:.1f} | {', '.join(f'{p:.2f}' for p in peak)} | "
              f"{', '.join(f'{b:.2f}' for b in built)} |")


if __name__ == "__main__":
    main()
