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
  or the teacher's x0;
- with ``--fit-steps N``: a copy of the student whose last step was fitted by regression (MSE,
  Adam, N steps) to the teacher's ODE on the student's own t=522 inputs (a separate pool of
  ``--fit-per-class`` chains per class). This bounds what the network's one jump can reach on
  those inputs when it is shown the answer directly, instead of learning it through DMD.

If finishing the student's own t=522 inputs with an ODE is precise but the one-jump last step is
not, the chain's inputs are good and the loss is in the last jump; if true inputs at sigma 0.522
give a precise last step, the student's inputs there are off the true marginal.

    megadmd convert to-diffusers RUN/checkpoints/step-N -o /tmp/student
    python tools/toy_last_step.py --generator /tmp/student
"""
from __future__ import annotations

import argparse
import copy

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


ODE_SIGMAS = [LAST_SIGMA] + [s for s in flow.euler_sigmas(50, 3.0) if s < LAST_SIGMA]


def velocity(model, text: torch.Tensor):
    return lambda x, t: predict_velocity(model, x, t, text, torch.float32)


@torch.no_grad()
def chain_inputs(student, per_class: int, seed: int) -> tuple:
    """Labels, text, the student's x0 at t=757 and its input at t=522, for one seeded draw."""
    labels, noise, renoise = eval_inputs(TOY_SPEC, per_class, seed, torch.device("cpu"))
    text, _ = conditions(TOY_SPEC, labels, noise.device)
    x0_757, x_522 = student_chain(student, noise, renoise, text)
    return labels, text, x0_757, x_522, renoise


@torch.no_grad()
def rows(student, teacher, inputs: tuple, seed: int) -> dict:
    """The table's rows for one draw of ``chain_inputs`` (made with the same ``seed``)."""
    labels, text, x0_757, x_522, renoise = inputs
    last, ode, vel = STUDENT_STEPS[-1], ODE_SIGMAS, lambda m: velocity(m, text)  # noqa: E731
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


def fit_last_step(student, teacher, per_class: int, seed: int, steps: int, lr: float,
                  batch: int = 32) -> tuple:
    """A copy of ``student`` whose x0 at t=522 is regressed (MSE) onto the teacher's ODE from the
    student's own t=522 inputs; returns it and the training-pool MSE before and after."""
    _, text, _, x_522, _ = chain_inputs(student, per_class, seed)
    with torch.no_grad():
        target = sample_teacher(velocity(teacher, text), None, x_522, ODE_SIGMAS)
    model = copy.deepcopy(student).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    last = STUDENT_STEPS[-1]

    def pool_mse() -> float:
        with torch.no_grad():
            return float(((x0_at(model, x_522, last, text) - target) ** 2).mean())

    before = pool_mse()
    for _ in range(steps):
        idx = torch.randint(0, x_522.shape[0], (min(batch, x_522.shape[0]),), generator=gen)
        loss = ((x0_at(model, x_522[idx], last, text[idx]) - target[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), before, pool_mse()


def print_row(name: str, r: dict) -> None:
    print(f"| {name} | {r['precision']:.3f} | {r['entropy']:.3f} | {r['frechet']:.3f} | "
          f"{r['q50']:.3f} | {r['q90']:.3f} | {r['q95']:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", required=True, help="a distilled toy generator (diffusers folder)")
    ap.add_argument("--teacher", default=str(builtin_teacher_dir()))
    ap.add_argument("--per-class", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--fit-steps", type=int, default=0,
                    help="also fit the student's last step to the teacher's ODE for this many steps")
    ap.add_argument("--fit-per-class", type=int, default=1024, help="training chains per class for --fit-steps")
    ap.add_argument("--fit-lr", type=float, default=3e-4)
    args = ap.parse_args()
    if args.per_class < 1 or args.fit_per_class < 1:
        ap.error("--per-class and --fit-per-class must be at least 1")
    if args.fit_steps < 0 or args.fit_lr <= 0:
        ap.error("--fit-steps must be >= 0 and --fit-lr positive")
    try:
        student = load_wan(args.generator, what="--generator").eval()
        teacher = load_wan(args.teacher, what="--teacher").eval()
    except ConfigError as exc:
        raise SystemExit(f"toy_last_step: error: {exc}")
    print("| sampler | precision | entropy | Frechet | nearest q50 | q90 | q95 |")
    print("|---|---|---|---|---|---|---|")
    inputs = chain_inputs(student, args.per_class, args.seed)
    for name, r in rows(student, teacher, inputs, args.seed).items():
        print_row(name, r)
    if args.fit_steps:
        fitted, before, after = fit_last_step(student, teacher, args.fit_per_class, args.seed + 1000,
                                              args.fit_steps, args.fit_lr)
        labels, text, _, x_522, _ = inputs
        with torch.no_grad():
            r = score(x0_at(fitted, x_522, STUDENT_STEPS[-1], text), labels)
        print_row(f"student 2 steps, last step fitted to the teacher ODE ({args.fit_steps} steps)", r)
        print(f"fit: training-pool MSE {before:.4f} -> {after:.4f}", flush=True)


if __name__ == "__main__":
    main()
