"""What content hashes cost a checkpoint save, and what verifying one costs at load.

Builds a one-process trainer on a Wan DiT sized by the options (default: 5 blocks of width 512,
about 21M parameters per model, a checkpoint of about 0.6 GB with the EMA), runs one iteration so
every optimizer state exists, then saves the same state repeatedly, alternating saves with
content hashes (what megadmd does) and without (file sizes only, as before hashing), and reports
the mean and median save time of each and their ratio (``--sha256``: also with SHA-256, the
hash megadmd does not use, for comparison); then the time to verify one checkpoint's hashes
(what resuming does, here on one rank).

``--sync`` includes ``os.sync()`` in each timed save: the time until the checkpoint is on disk,
not just in the page cache (where a save on this machine runs at memory speed, the worst case
for the hashing's share). ``--overlap`` saves as a run's periodic saves do: the timed part is
the writes plus the completion after one (untimed) training iteration, during which the pool
hashes; without it each save waits for its hashes, like the last save of a run.

    python tools/bench_checkpoint.py --reps 4
    python tools/bench_checkpoint.py --reps 4 --sync
    python tools/bench_checkpoint.py --reps 4 --overlap
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def build(tmp: Path, layers: int, heads: int, head_dim: int, ffn: int):
    from megadmd.config import resolve
    from megadmd.data.make import write_random_dataset
    from megadmd.models import build_wan
    from megadmd.runner import build_trainer

    config = dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=ffn, num_layers=layers, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
    build_wan(config, seed=0).save_pretrained(str(tmp / "model"))
    write_random_dataset(tmp / "data", num_samples=4, latent_shape=[4, 2, 4, 4], text_len=4, text_dim=32)
    cfg = resolve(overrides=[
        f"model.teacher_path={tmp / 'model'}", f"data.path={tmp / 'data'}", f"output_dir={tmp / 'run'}",
        "train.micro_batch_size=1", "dmd.generator_update_interval=1", "ema.decay=0.9", "logging.tensorboard=false",
        "checkpoint.interval_steps=0", "checkpoint.keep_last=0", "train.max_steps=1000000"])
    trainer = build_trainer(cfg)
    trainer.train_step(1)  # both roles step: every Adam moment exists
    trainer.state.step = 1
    return trainer


def _cpu_s() -> float:
    """CPU seconds of this process, every thread (the hashing pool's included)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=4, help="saves of each kind, alternating")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--sync", action="store_true", help="time each save until os.sync() returns")
    ap.add_argument("--sha256", action="store_true", help="also time saves hashed with SHA-256 instead of XXH3")
    ap.add_argument("--overlap", action="store_true",
                    help="save as the periodic saves of a run do: a training iteration (not timed) runs between "
                         "the writes and the completion, while the files are hashed")
    args = ap.parse_args()
    import xxhash

    from megadmd.safety import manifest

    tmp = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir))
    try:
        trainer = build(tmp, args.layers, args.heads, args.head_dim, args.ffn)
        ckpt = trainer.checkpointer
        kinds = ["xxh3", "sizes"] + (["sha256"] if args.sha256 else [])
        times = {k: [] for k in kinds}
        cpu = {k: [] for k in kinds}
        size = 0
        for i in range(len(kinds) * args.reps + 1):
            kind = kinds[i % len(kinds)]
            ckpt.hash_files = kind != "sizes"
            manifest._new_hash = hashlib.sha256 if kind == "sha256" else xxhash.xxh3_128
            trainer.state.step = 100 + i
            os.sync()  # the previous save's writeback is not this one's cost
            t0, c0 = time.perf_counter(), _cpu_s()
            path = ckpt.save(trainer, wait=not args.overlap)
            dt, dc = time.perf_counter() - t0, _cpu_s() - c0
            if args.overlap:  # a training iteration runs while the pool hashes (not timed)
                trainer.train_step(2)
                t0 = time.perf_counter()
                ckpt.finish_pending()
                dt += time.perf_counter() - t0
            if args.sync:
                t0 = time.perf_counter()
                os.sync()
                dt += time.perf_counter() - t0
            if i > 0:  # the first save warms the page cache and DeepSpeed's paths up
                times[kind].append(dt)
                cpu[kind].append(dc)
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            if kind == "xxh3":
                t0 = time.perf_counter()
                assert manifest.verify(path) is None
                verify_s = time.perf_counter() - t0
            shutil.rmtree(path)
        n_params = sum(p.ds_numel for p in trainer.models.generator.module.parameters())
        print(f"checkpoint {size / 2**20:.0f} MiB (generator and fake score {n_params / 1e6:.1f}M parameters each, "
              f"Adam states, EMA), 1 rank, {manifest.default_threads()} hashing threads, {args.reps} saves of each "
              f"kind, alternating{', each until os.sync() returned' if args.sync else ''}"
              f"{', completed after a training iteration' if args.overlap else ''}")
        print("| save | mean s | median s | each (s) | median CPU s (all threads) |")
        print("|---|---|---|---|---|")
        labels = {"sizes": "sizes only (before hashes)", "xxh3": "XXH3-128 hashes (megadmd)",
                  "sha256": "SHA-256 hashes (for comparison)"}
        for kind in kinds:
            t = times[kind]
            print(f"| {labels[kind]} | {statistics.mean(t):.2f} | {statistics.median(t):.2f} | "
                  f"{', '.join(f'{x:.2f}' for x in t)} | {statistics.median(cpu[kind]):.2f} |")
        for kind in kinds[:1] + kinds[2:]:
            ratio = statistics.median(times[kind]) / statistics.median(times["sizes"])
            cpu_ratio = statistics.median(cpu[kind]) / statistics.median(cpu["sizes"])
            print(f"median ratio {kind} / sizes only: {ratio:.2f} wall, {cpu_ratio:.2f} CPU")
        print(f"verifying one checkpoint's XXH3 hashes (one rank): {verify_s:.2f} s, "
              f"{size / 2**20 / verify_s:.0f} MiB/s")
        trainer.run_lock.release()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
