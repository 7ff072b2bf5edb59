"""Train the toy teacher: a flow-matching Wan DiT (``TINY_WAN_CONFIG``) on the toy distribution.

The teacher learns ``v = eps - x0`` at ``x_t = (1 - sigma) x0 + sigma eps`` (megadmd.flow), with
fresh true samples every step and class dropout: with probability ``--p-uncond`` the class
embedding is replaced by the null embedding, so one model gives both halves of CFG. Plain PyTorch,
AdamW with warm-up and cosine decay, an EMA of the weights (the EMA is what is evaluated and saved).

Afterwards the EMA teacher is measured with megadmd.toy.metrics.evaluate at 50 Euler steps
(shift 3, Wan's schedule) and at 3 steps (the generator's sigmas 1, 0.757, 0.522), each with CFG
(the DMD target's guidance: offset form, scale 3.5) and without, next to true samples (the floor)
and the exact analytic velocity of the toy distribution run through the same samplers (a perfect
teacher). The table goes to stdout and, with the arguments, into ``training.json`` in the saved
folder. With the defaults (one CPU thread, seeded) a run is reproducible on the same torch build:

    python tools/train_toy_teacher.py            # writes megadmd/assets/toy_teacher
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from megadmd import flow
from megadmd.io_utils import atomic_dir
from megadmd.config import ConfigError
from megadmd.models import build_wan, load_wan, predict_velocity
from megadmd.presets import TINY_WAN_CONFIG
from megadmd.sampling import sample_teacher
from megadmd.toy.builtin import builtin_teacher_dir
from megadmd.toy.distribution import ToySpec, class_embeddings, modes, null_embedding, sample
from megadmd.toy.metrics import evaluate

GENERATOR_SIGMAS = [1.0, 0.757, 0.522, 0.0]  # the tiny preset's denoising steps [1000, 757, 522]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", default=str(builtin_teacher_dir()))
    p.add_argument("--init", default=None,
                   help="continue from this saved teacher folder instead of fresh weights")
    p.add_argument("--num-layers", type=int, default=None,
                   help=f"transformer blocks of a fresh teacher (default {TINY_WAN_CONFIG['num_layers']}, "
                        "the shipped one's); a larger toy is an experiment, not the shipped default")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.2, help="class dropout for CFG")
    p.add_argument("--train-shift", type=float, default=3.0,
                   help="training sigmas are shift(u) for uniform u (1 = uniform sigma)")
    p.add_argument("--sample-shift", type=float, default=3.0)
    p.add_argument("--guidance-scale", type=float, default=3.5)
    p.add_argument("--cfg-form", default="offset", choices=["offset", "standard"])
    p.add_argument("--eval-per-class", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default); more than 1 is slower on a busy CPU")
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--evaluate", metavar="FOLDER", default=None,
                   help="only score this saved teacher (the table, at --eval-per-class); trains and writes nothing")
    args = p.parse_args()
    if args.num_layers is not None and (args.init or args.num_layers < 1):
        p.error("--num-layers must be at least 1, and applies only to a fresh teacher (not with --init)")
    return args


class ToyConditions:
    """The text embeddings of the toy classes and the null embedding, looked up per sample."""

    def __init__(self, spec: ToySpec):
        self.classes = class_embeddings(spec)
        self.null = null_embedding(spec)

    def text(self, labels: torch.Tensor, uncond: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.classes[labels]
        if uncond is not None:
            emb = torch.where(uncond[:, None, None], self.null.expand_as(emb), emb)
        return emb

    def null_text(self, n: int) -> torch.Tensor:
        return self.null.expand(n, *self.null.shape)


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train(model, spec: ToySpec, cond: ToyConditions, args) -> torch.nn.Module:
    """Flow-matching training on fresh toy samples; returns the EMA model."""
    g = torch.Generator().manual_seed(args.seed + 1)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, args.warmup_steps, args.steps))
    model.train()
    start, window = time.time(), []
    for step in range(args.steps):
        labels = torch.randint(0, spec.num_classes, (args.batch_size,), generator=g)
        x0, _ = sample(spec, labels, g)
        eps = torch.randn(x0.shape, generator=g)
        sigma = flow.shift_sigma(torch.rand(args.batch_size, generator=g), args.train_shift)
        uncond = torch.rand(args.batch_size, generator=g) < args.p_uncond
        x_t = flow.add_noise(x0, eps, sigma)
        v = predict_velocity(model, x_t, sigma * flow.NUM_TRAIN_TIMESTEPS,
                             cond.text(labels, uncond), torch.float32)
        loss = torch.mean((v - flow.velocity_target(x0, eps)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            # A short EMA horizon early on, so the initial weights do not linger in short runs.
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        window.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1:6d}  loss {sum(window) / len(window):.4f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - start:6.0f}s", flush=True)
            window = []
    return ema.eval()


def model_velocity(model, text: torch.Tensor, chunk: int = 256):
    """``v(x_t, t)`` of a Wan DiT for a fixed per-sample text, evaluated in chunks."""
    def vfn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([predict_velocity(model, x_t[i:i + chunk], t[i:i + chunk],
                                               text[i:i + chunk], torch.float32)
                              for i in range(0, x_t.shape[0], chunk)])
    return vfn


def exact_velocity(spec: ToySpec, labels: torch.Tensor | None):
    """The exact velocity ``E[eps - x0 | x_t]`` of the toy distribution (all classes when
    ``labels`` is None, i.e. the unconditional model). Each mode is ``N(m, s^2 I)``, so given the
    mode, ``x_t ~ N((1 - sigma) m, ((1 - sigma)^2 s^2 + sigma^2) I)``; the posterior weighs the
    modes by that likelihood and shrinks ``x_t - (1 - sigma) m`` towards the mode."""
    table = modes(spec).flatten(2).to(torch.float64)  # [K, M, D]
    s2 = spec.noise_std ** 2

    def vfn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x_t.shape[0]
        if labels is None:
            own = table.reshape(1, -1, table.shape[-1]).expand(n, -1, -1)  # all K*M modes
        else:
            own = table[labels]  # [n, M, D]
        sigma = flow.sigma_from_t(t).to(torch.float64).view(n, 1, 1)
        x = x_t.reshape(n, 1, -1).to(torch.float64)
        var = (1 - sigma) ** 2 * s2 + sigma ** 2
        resid = x - (1 - sigma) * own
        weights = torch.softmax(-resid.pow(2).sum(-1) / (2 * var[..., 0]), dim=1)[..., None]
        x0 = (weights * (own + (1 - sigma) * s2 / var * resid)).sum(1)
        return ((x[:, 0] - x0) / sigma[:, 0]).reshape(x_t.shape).float()
    return vfn


def quality_table(vfns: dict, spec: ToySpec, args) -> list[dict]:
    """Evaluate every velocity model at 50 and 3 steps, with and without CFG, on shared noise."""
    g = torch.Generator().manual_seed(args.seed + 2)
    labels = torch.arange(args.eval_per_class * spec.num_classes) % spec.num_classes
    true_samples, _ = sample(spec, labels, g)
    rows = [dict(model="true samples", steps="-", cfg="-", **evaluate(true_samples, labels, spec))]
    print(f"{'model':<14} {'steps':>5} {'cfg':>5}  {'precision':>9} {'coverage':>8} "
          f"{'entropy':>7} {'frechet':>8} {'nearest_rms':>11}")
    print(format_row(rows[0]))
    noise = torch.randn((labels.shape[0], *spec.latent_shape), generator=g)
    schedules = {50: flow.euler_sigmas(50, args.sample_shift), 3: GENERATOR_SIGMAS}
    for name, make in vfns.items():
        vfn_cond, vfn_uncond = make(labels)
        for steps, sigmas in schedules.items():
            for use_cfg in (True, False):
                t0 = time.time()
                x = sample_teacher(vfn_cond, vfn_uncond if use_cfg else None, noise, sigmas,
                                   args.guidance_scale, args.cfg_form)
                row = dict(model=name, steps=steps, cfg=args.guidance_scale if use_cfg else "off",
                           **evaluate(x, labels, spec))
                rows.append(row)
                print(format_row(row), f"  ({time.time() - t0:.0f}s)", flush=True)
    return rows


def format_row(row: dict) -> str:
    return (f"{row['model']:<14} {str(row['steps']):>5} {str(row['cfg']):>5}  "
            f"{row['precision']:9.3f} {row['coverage']:8.3f} {row['entropy']:7.3f} "
            f"{row['frechet']:8.4f} {row['nearest_rms']:11.4f}")


def markdown_table(rows: list[dict]) -> str:
    """The table as docs/quality-benchmark.md shows it."""
    lines = ["| model | steps | CFG | precision | coverage | entropy | frechet | nearest_rms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['cfg']} | {r['precision']:.3f} | "
                     f"{r['coverage']:.3f} | {r['entropy']:.3f} | {r['frechet']:.4f} | "
                     f"{r['nearest_rms']:.3f} |")
    return "\n".join(lines)


def velocity_models(teacher, spec: ToySpec, cond: ToyConditions) -> dict:
    """Each entry maps the evaluation labels to (conditional, unconditional) velocity functions."""
    return {"teacher": lambda labels: (model_velocity(teacher, cond.text(labels)),
                                       model_velocity(teacher, cond.null_text(len(labels)))),
            "exact velocity": lambda labels: (exact_velocity(spec, labels), exact_velocity(spec, None))}


def main() -> None:
    args = parse_args()
    try:  # a bad --init or --evaluate folder fails here, before any work
        arch = dict(TINY_WAN_CONFIG, num_layers=args.num_layers or TINY_WAN_CONFIG["num_layers"])
        if args.evaluate:
            model = load_wan(args.evaluate, what="--evaluate teacher").eval()
        else:
            model = load_wan(args.init, what="--init teacher") if args.init else build_wan(arch, seed=args.seed)
    except ConfigError as exc:
        raise SystemExit(f"train_toy_teacher: error: {exc}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = ToySpec()
    cond = ToyConditions(spec)
    print(f"teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters")
    if args.evaluate:
        print(markdown_table(quality_table(velocity_models(model, spec, cond), spec, args)))
        return
    start = time.time()
    teacher = train(model, spec, cond, args)
    train_s = time.time() - start

    rows = quality_table(velocity_models(teacher, spec, cond), spec, args)
    print(f"training: {train_s:.0f}s for {args.steps} steps\n")
    print(markdown_table(rows))

    with atomic_dir(args.output) as tmp:
        teacher.save_pretrained(tmp, safe_serialization=True)
        record = dict(args=vars(args), train_s=round(train_s), quality=rows)
        (Path(tmp) / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        for path in [tmp, *Path(tmp).iterdir()]:  # mkdtemp makes the folder private
            path.chmod(0o755 if path.is_dir() else 0o644)
    print(f"saved the EMA teacher to {args.output}")


if __name__ == "__main__":
    main()
