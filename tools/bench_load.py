"""Peak host memory of loading a trainable role for bf16 training: an fp32 load cast to bf16
(megadmd before 2026-11-26) against a load straight at bf16 (now), for checkpoints stored in fp32
and in bf16.

Builds a Wan DiT of the Wan2.1 1.3B width with ``--layers`` blocks, saves it both ways in a
temporary folder, and loads each in a fresh process (each process's peak RSS, VmHWM).

    python tools/bench_load.py --layers 6
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import peak_rss_gib


def _load(path: str, how: str) -> None:
    import torch

    from megadmd.models import load_wan

    dtype = torch.float32 if how == "fp32-then-cast" else torch.bfloat16
    load_wan(path, dtype).to(torch.bfloat16)
    print(peak_rss_gib())  # the parent holds a whole model: ru_maxrss would include it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--_load", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._load:
        return _load(*args._load)
    if args.layers < 1:
        ap.error("--layers must be at least 1")
    import torch

    from megadmd.models import build_wan
    from megadmd.presets import WAN21_1_3B_CONFIG

    with tempfile.TemporaryDirectory() as tmp:
        model = build_wan(dict(WAN21_1_3B_CONFIG, num_layers=args.layers))
        n = sum(p.numel() for p in model.parameters())
        model.save_pretrained(f"{tmp}/fp32", safe_serialization=True)
        model.to(torch.bfloat16).save_pretrained(f"{tmp}/bf16", safe_serialization=True)
        del model
        print(f"Wan DiT, {args.layers} blocks of the 1.3B width: {n / 1e6:.0f}M parameters")
        print("| checkpoint | fp32 load, cast to bf16 | load at bf16 |\n|---|---|---|")
        for stored in ("fp32", "bf16"):
            peaks = []
            for how in ("fp32-then-cast", "bf16"):
                out = subprocess.run([sys.executable, __file__, "--_load", f"{tmp}/{stored}", how],
                                     capture_output=True, text=True, check=True).stdout
                peaks.append(float(out.strip().splitlines()[-1]))
            size = sum(f.stat().st_size for f in Path(tmp, stored).iterdir()) / 2**30
            print(f"| {stored} ({size:.2f} GiB) | {peaks[0]:.2f} GiB | {peaks[1]:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
