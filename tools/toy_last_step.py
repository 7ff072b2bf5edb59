"""Where a distilled toy student loses precision: its chain, step by step, and the alternatives.

A 3-step student samples x0 at t=1000, re-noises it to t=757, predicts x0 again, re-noises to
t=522 and takes its last x0 there. This script scores (toy metrics, plus quantiles of the RMS
distance to the nearest mode of the sample's class) the student's final samples next to what
other ways of finishing the same chain would give:

- the student's x0 at its second step (t=757), before re-noising;
- the student's first two steps, then the teacher's x0 at t=522 instead of the student's;
- the student's first two steps, then the teacher's (or the student's) 50-step Euler ODE from
  sigma 0.522 down to 0, instead of one jump;
- true samples noised to sigma 0.522 (the exact marginal there), then the student's last step
  or the teacher's x0.

If finishing the student's own t=522 inputs with an ODE is precise but the one-jump last step is
not, the chain's inputs are good and the loss is in the last jump; if true inputs at sigma 0.522
give a precise last step, the student's inputs there are off the true marginal.

    megadmd convert to-diffusers RUN/checkpoints/step-N -o /tmp/student
    python tools/toy_last_step.py --generator /tmp/student
"""
from __future__ import annotations

import argparse

import torch

from megadmd import flow
from megadmd.config import ConfigError
from megadmd.models import load_wan, predict_velocity
from megadmd.sampling import sample_teacher
from megadmd.toy.builtin import TOY_SPEC, builtin_teacher_dir
from megadmd.toy.distribution import sample as true_samples
from megadmd.toy.metrics import evaluate, rms_to_modes
from megadmd.toy.quality import STUDENT_STEPS, conditions, eval_inputs

LAST_SIGMA = STUDENT_STEPS[-1] / flow.NUM_TRAIN_TIMESTEPS


def score(x: torch.Tensor, labels: torch.Tensor) -> dict:
    """The toy metrics and the 50/90/95% quantiles of the nearest-mode RMS distance."""
    nearest = rms_to_modes(x, labels, TOY_SPEC).min(dim=1).values.float()
    q = torch.quantile(nearest, torch.tensor([0.5, 0.9, 0.95]))
    return {**evaluate(x, labels, TOY_SPEC), "q50": q[0].item(), "q90": q[1].item(), "q95": q[2].item()}


def x0_at(model, x: torch.Tensor, t: float, text: torch.Tensor) -> torch.Tensor:
    tt = torch.full((x.shape[0],), float(t))
    return flow.x0_from_velocity(x, predict_velocity(model, x, tt, text, torch.float32), flow.sigma_from_t(tt))


def student_chain(student, noise: torch.Tensor, renoise: torch.Tensor, text: torch.Tensor) -> tuple:
    """The student's x0 at t=757 and its input at t=522 (the DMD sampler: fresh noise)."""
    x0 = x0_at(student, noise, STUDENT_STEPS[0], text)
    x = flow.add_noise(x0, renoise[0], flow.sigma_from_t(torch.tensor(float(STUDENT_STEPS[1]))))
    x0_757 = x0_at(student, x, STUDENT_STEPS[1], text)
    x_522 = flow.add_noise(x0_757, renoise[1], torch.tensor(LAST_SIGMA))
    return x0_757, x_522


@torch.no_grad()
def rows(student, teacher, per_class: int, seed: int) -> dict:
    labels, noise, renoise = eval_inputs(TOY_SPEC, per_class, seed, torch.device("cpu"))
    text, _ = conditions(TOY_SPEC, labels, noise.device)
    x0_757, x_522 = student_chain(student, noise, renoise, text)
    last = STUDENT_STEPS[-1]
    ode = [LAST_SIGMA] + [s for s in flow.euler_sigmas(50, 3.0) if s < LAST_SIGMA]
    vel = lambda m: lambda x, t: predict_velocity(m, x, t, text, torch.float32)  # noqa: E731
    clean, _ = true_samples(TOY_SPEC, labels, torch.Generator().manual_seed(seed + 1))
    x_true = flow.add_noise(clean, renoise[1], torch.tensor(LAST_SIGMA))
    return {
        "student, 3 steps": score(x0_at(student, x_522, last, text), labels),
        "student x0 at t=757": score(x0_757, labels),
        "student 2 steps, teacher x0 at t=522": score(x0_at(teacher, x_522, last, text), labels),
        "student 2 steps, teacher ODE from 0.522": score(sample_teacher(vel(teacher), None, x_522, ode), labels),
        "student 2 steps, student ODE from 0.522": score(sample_teacher(vel(student), None, x_522, ode), labels),
        "true x at 0.522, student last step": score(x0_at(student, x_true, last, text), labels),
        "true x at 0.522, teacher x0": score(x0_at(teacher, x_true, last, text), labels),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", required=True, help="a distilled toy generator (diffusers folder)")
    ap.add_argument("--teacher", default=str(builtin_teacher_dir()))
    ap.add_argument("--per-class", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    if args.per_class < 1:
        ap.error("--per-class must be at least 1")
    try:
        student = load_wan(args.generator, what="--generator").eval()
        teacher = load_wan(args.teacher, what="--teacher").eval()
    except ConfigError as exc:
        raise SystemExit(f"toy_last_step: error: {exc}")
    print("| sampler | precision | entropy | Frechet | nearest q50 | q90 | q95 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows(student, teacher, args.per_class, args.seed).items():
        print(f"| {name} | {r['precision']:.3f} | {r['entropy']:.3f} | {r['frechet']:.3f} | "
              f"{r['q50']:.3f} | {r['q90']:.3f} | {r['q95']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
