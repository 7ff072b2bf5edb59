"""Write the built-in preset's dmd.regression pairs into the package (``megadmd/assets/toy_pairs``).

``megadmd train`` on the tiny preset regresses the student on 512 (noise, latent) pairs of the
toy teacher's 16-step ODE with CFG. Sampling them took about 40 s of every fresh default run (a
sixth of it). The package ships their latents instead; the noise is re-drawn from its seeds at
start-up. A run uses the shipped latents only when the teacher (config and weights, by hash) and
every ODE setting match the file's metadata, and samples the ODE otherwise. Rerun this after
changing the toy teacher or the tiny preset's DMD settings; tests/unit/test_toy_pairs.py fails
until then.

    python tools/toy_pairs_asset.py --overwrite        # refresh the shipped file
    python tools/toy_pairs_asset.py -o /tmp/pairs.safetensors
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from safetensors.torch import save

from megadmd.config import resolve
from megadmd.io_utils import atomic_file
from megadmd.toy.builtin import (TOY_PAIR_ODE_STEPS, TOY_PAIRS, builtin_teacher_dir, pair_recipe, sample_pair_latents,
                                 shipped_pairs_path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default=str(shipped_pairs_path()), help="default: the package's file")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing file")
    args = ap.parse_args()
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite to replace it")
    cfg = resolve()  # the tiny preset, as `megadmd train` resolves it with no arguments
    d, teacher = cfg.dmd, builtin_teacher_dir()
    recipe = pair_recipe(teacher, TOY_PAIRS, TOY_PAIR_ODE_STEPS, d.guidance_scale, d.cfg_form, d.flow_shift,
                         cfg.train.seed)
    t0 = time.perf_counter()
    latents = sample_pair_latents(teacher, TOY_PAIRS, TOY_PAIR_ODE_STEPS, d.guidance_scale, d.cfg_form,
                                  d.flow_shift, cfg.train.seed)
    with atomic_file(out) as f:
        f.write(save({"latents": latents.contiguous()}, metadata=recipe))
    print(f"{out}: {TOY_PAIRS} latents of the {TOY_PAIR_ODE_STEPS}-step ODE in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
