"""Where does a 3-step toy student pick its mode? Per sampler step, the histogram of nearest modes.

For each of the student's steps (t = 1000, 757, 522) it prints, per class, how many samples'
x0 prediction lies nearest to each of the class's modes, the mean RMS distance to that nearest
mode, and the share of samples whose nearest mode changed since the previous step. On the toy
problem this shows that the t=1000 prediction is nearly the class mean (RMS ~0.75 from every
mode) and that DMD training tilts it towards one mode, which the later steps then follow.

    python tools/toy_step_modes.py                                # the shipped toy teacher
    python tools/toy_step_modes.py --model runs/x/export          # a converted generator
    python tools/toy_step_modes.py --train-steps 200 --set optim.generator.lr=5e-5
"""
from __future__ import annotations

import argparse
import tempfile

import torch


def load_model(args):
    from megadmd.models import load_wan
    from megadmd.toy.builtin import builtin_teacher_dir

    if not args.train_steps:
        return load_wan(args.model or str(builtin_teacher_dir())).eval()
    from megadmd.config import resolve
    from megadmd.runner import run_train

    tmp = tempfile.mkdtemp(prefix="toy-step-modes-")
    overrides = [f"output_dir={tmp}", "logging.tensorboard=false", "checkpoint.interval_steps=0",
                 "validation.interval_steps=0", f"train.max_steps={args.train_steps}", *args.overrides]
    return run_train(resolve(overrides=overrides)).models.generator.module


@torch.no_grad()
def step_report(model, per_class: int, seed: int) -> list[dict]:
    from megadmd import flow
    from megadmd.models import predict_velocity
    from megadmd.toy.builtin import TOY_SPEC
    from megadmd.toy.metrics import rms_to_modes
    from megadmd.toy.quality import STUDENT_STEPS, conditions, eval_inputs

    labels, noise, renoise = eval_inputs(TOY_SPEC, per_class, seed, torch.device("cpu"))
    cond, _ = conditions(TOY_SPEC, labels, noise.device)
    x, previous, rows = noise, None, []
    for i, t in enumerate(STUDENT_STEPS):
        tt = torch.full((x.shape[0],), float(t))
        x0 = flow.x0_from_velocity(x, predict_velocity(model, x, tt, cond, torch.float32), flow.sigma_from_t(tt))
        dist = rms_to_modes(x0.float(), labels, TOY_SPEC)
        nearest = dist.argmin(1)
        hist = [torch.bincount(nearest[labels == k], minlength=TOY_SPEC.modes_per_class).tolist()
                for k in range(TOY_SPEC.num_classes)]
        switched = None if previous is None else float((nearest != previous).float().mean())
        rows.append({"t": t, "hist": hist, "nearest_rms": float(dist.min(1).values.mean()), "switched": switched})
        previous = nearest
        if i + 1 < len(STUDENT_STEPS):
            t_next = torch.full_like(tt, float(STUDENT_STEPS[i + 1]))
            x = flow.add_noise(x0, renoise[i], flow.sigma_from_t(t_next))
    return rows


def main() -> None:
    from megadmd.monitoring.console import setup_console

    setup_console()  # the CLI's warning filters and log lines: this trains with run_train
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a diffusers Wan folder (default: the shipped toy teacher)")
    ap.add_argument("--train-steps", type=int, default=0, help="distill this many iterations first (tiny preset)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--per-class", type=int, default=128)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for r in step_report(load_model(args), args.per_class, args.seed):
        sw = "-" if r["switched"] is None else f"{r['switched']:.3f}"
        print(f"t={r['t']:>4}  nearest-mode counts per class {r['hist']}  nearest RMS {r['nearest_rms']:.3f}  "
              f"switched {sw}")


if __name__ == "__main__":
    main()
