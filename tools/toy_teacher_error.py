"""How far a toy teacher's x0 predictions are from the exact ones, per noise level.

The toy distribution has an exact posterior (``exact_velocity`` in train_toy_teacher.py), so a
teacher's error can be measured directly instead of through samplers. For true samples noised to
each sigma, this prints the RMS error of the teacher's x0 prediction against the exact one for the
conditional branch, the unconditional branch and the CFG-guided combination that DMD uses as its
real score (offset form: ``x0_c + s (x0_c - x0_u)``), next to the size of the guidance direction
``x0_c - x0_u`` for the teacher and for the exact model. Where the exact guidance direction is 0
(the class is already decided), the guided error is the branches' disagreement amplified by ``s``.

    python tools/toy_teacher_error.py                      # the shipped teacher
    python tools/toy_teacher_error.py --teacher PATH --per-class 128
"""
from __future__ import annotations

import argparse

import torch
from train_toy_teacher import ToyConditions, exact_velocity, model_velocity  # the script's folder

from megadmd import flow
from megadmd.config import ConfigError
from megadmd.models import load_wan
from megadmd.toy.builtin import TOY_SPEC, builtin_teacher_dir
from megadmd.toy.distribution import sample

SIGMAS = [0.99, 0.9, 0.757, 0.6, 0.522, 0.4, 0.25, 0.1, 0.03]


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


def error_rows(teacher, per_class: int, scale: float, seed: int) -> list[dict]:
    """One row per sigma; x0 errors are ``sigma`` times velocity errors (x0 = x_t - sigma v)."""
    spec, cond = TOY_SPEC, ToyConditions(TOY_SPEC)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(per_class * spec.num_classes) % spec.num_classes
    x0, _ = sample(spec, labels, g)
    eps = torch.randn(x0.shape, generator=g)
    v_model = (model_velocity(teacher, cond.text(labels)), model_velocity(teacher, cond.null_text(len(labels))))
    v_exact = (exact_velocity(spec, labels), exact_velocity(spec, None))
    rows = []
    for s in SIGMAS:
        sigma = torch.full((len(labels),), s)
        x_t, t = flow.add_noise(x0, eps, sigma), sigma * flow.NUM_TRAIN_TIMESTEPS
        mc, mu = (f(x_t, t) for f in v_model)
        ec, eu = (f(x_t, t) for f in v_exact)
        rows.append(dict(sigma=s, cond=s * rms(mc - ec), uncond=s * rms(mu - eu),
                         guided=s * rms((1 + scale) * (mc - ec) - scale * (mu - eu)),
                         direction_teacher=s * rms(mc - mu), direction_exact=s * rms(ec - eu)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default=str(builtin_teacher_dir()))
    ap.add_argument("--per-class", type=int, default=128, help="true samples per class")
    ap.add_argument("--guidance-scale", type=float, default=3.5, help="offset-form CFG scale")
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args()
    if args.per_class < 1:
        ap.error("--per-class must be at least 1")
    try:
        teacher = load_wan(args.teacher, what="--teacher").eval()
    except ConfigError as exc:
        ap.error(str(exc))
    print(f"x0 RMS error against the exact posterior, {args.per_class} true samples per class, "
          f"CFG {args.guidance_scale} (offset form)")
    print("| sigma | cond | uncond | guided | x0_c - x0_u, teacher | x0_c - x0_u, exact |")
    print("|---|---|---|---|---|---|")
    for r in error_rows(teacher, args.per_class, args.guidance_scale, args.seed):
        print(f"| {r['sigma']:.3f} | {r['cond']:.3f} | {r['uncond']:.3f} | {r['guided']:.3f} | "
              f"{r['direction_teacher']:.3f} | {r['direction_exact']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
