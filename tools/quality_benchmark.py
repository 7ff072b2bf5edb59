"""The quality benchmark: does DMD2 distillation keep its teacher's distribution?

End to end on the toy problem (megadmd/toy): the shipped toy teacher (or ``--teacher``) is
distilled to the 3-step schedule by megadmd's own training code (``run_train``, the function
behind ``megadmd train``), and every sampler below is scored on the same labels and noise with the
toy metrics (megadmd/toy/metrics.py) plus the label-free diversity statistic:

- references: true samples (the floor), the teacher at 50 and 3 steps with and without CFG (offset
  3.5, the DMD target's guidance), and the teacher's weights in the 3-step DMD sampler (the
  generator before training);
- step equivalence: the teacher at K Euler steps with CFG (2K forwards) for K in ``STEP_LADDER``,
  and the smallest K at which it is at least as good as the student on precision and Frechet;
- students: the default recipe (what ``megadmd train`` runs; its generator's EMA is scored, as
  ``megadmd export-ema`` ships it), the FastVideo recipe it replaced, and one ablation per part
  of the recipe (that part reverted; the GAN term's row is the one its target is judged on), plus
  the recipe with LoRA adapters (issue 20). A run with an EMA is scored by its EMA weights, one without by its live ones.

Rows run in ``--jobs`` worker processes of one thread each. The recipe's regression pairs (the
toy teacher's ODE from stored noise) are sampled once and shared by every run that uses them, as
``megadmd train`` samples them once per output folder.

    python tools/quality_benchmark.py --out quality.json     # everything (under 40 min on 2 cores)
    python tools/quality_benchmark.py --no-ablations         # references, ladder and the students
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

STEP_LADDER = (3, 4, 6, 8, 12, 16, 24, 32, 50)
DEFAULT = "student@3, default recipe (megadmd train)"
# The recipe's parts, each with the overrides that revert it (the ablation rows). The recipe
# itself is the tiny preset (megadmd/presets.py); docs/quality-benchmark.md says why each part.
ABLATIONS = {
    "no regression (dmd.regression.weight=0)": ["dmd.regression.weight=0.0"],
    "regression through all 3 steps (num_steps=0)": ["dmd.regression.num_steps=0"],
    "first step also trained by DMD (train_first_step=true)": ["dmd.train_first_step=true"],
    "synthetic-latent mode (not data-free)": ["dmd.simulate_generator_forward=false"],
    "guidance at every timestep (guidance_interval=[0,1])": ["dmd.guidance_interval=[0.0,1.0]"],
    "generator updated every 5th iteration (generator_update_interval=5)": ["dmd.generator_update_interval=5"],
    "300 iterations (train.max_steps=300)": ["train.max_steps=300"],
    "the live weights, no EMA (ema.decay=0)": ["ema.decay=0.0"],
}
# The LoRA row (issue 20): both trainable roles rank-16 adapters (of the 96-wide toy DiT) over the
# frozen teacher, at 5x the recipe's learning rates (BENCHMARKS.md, 'LoRA student'; docs/lora.md).
LORA_RANK = 16
LORA_ROW = f"recipe with LoRA rank {LORA_RANK} (generator and fake score)"
LORA_RECIPE = ["model.lora.enabled=true", f"model.lora.rank={LORA_RANK}", "optim.generator.lr=1e-3",
               "optim.fake_score.lr=1e-3"]
# The GAN term is part of the recipe (the toy recipe's generator weight 1.0); its target (issue 17)
# compares the recipe with this row, the same run without it.
NO_GAN_ROW = "recipe without the GAN term (dmd.gan.enabled=false)"
NO_GAN = ["dmd.gan.enabled=false"]
FASTVIDEO = ("student@3, FastVideo recipe (synthetic mode, every step, CFG everywhere, no regression, 125 it)",
             ["dmd.simulate_generator_forward=false", "dmd.train_first_step=true", "dmd.guidance_interval=[0.0,1.0]",
              "dmd.regression.weight=0.0", "train.max_steps=125", "optim.generator.lr=5e-5",
              "dmd.generator_update_interval=5", "ema.decay=0.0", "dmd.gan.enabled=false"])


# --- work done in the worker processes ---------------------------------------------------------
def _worker_init() -> None:
    import torch

    from megadmd.monitoring.console import quiet_known_warnings

    torch.set_num_threads(1)
    quiet_known_warnings()  # the CLI's filters: a spawned worker starts without the parent's


def _inputs(args: dict, num_steps: int = 3):
    import torch

    from megadmd.toy.builtin import TOY_SPEC
    from megadmd.toy.quality import eval_inputs

    return eval_inputs(TOY_SPEC, args["per_class"], args["seed"], torch.device("cpu"), num_steps)


def _score(samples, labels) -> dict:
    from megadmd.toy.builtin import TOY_SPEC
    from megadmd.toy.quality import score

    return score(samples.cpu(), labels, TOY_SPEC)


def sampler_row(args: dict, kind: str, steps: int = 50, guidance: float = 3.5) -> dict:
    """A teacher sampler (or the truth: ``kind == "truth"``) scored on the benchmark's inputs."""
    import torch

    from megadmd.models import load_wan
    from megadmd.toy.builtin import TOY_SPEC
    from megadmd.toy.distribution import sample as true_samples
    from megadmd.toy.quality import sample

    labels, noise, renoise = _inputs(args)
    t0 = time.perf_counter()
    if kind == "truth":
        x, _ = true_samples(TOY_SPEC, labels, torch.Generator().manual_seed(args["seed"]))
    else:
        x = sample(load_wan(args["teacher"]).eval(), kind, TOY_SPEC, labels, noise, renoise,
                   guidance_scale=guidance, steps=steps)
    return {**_score(x, labels), "sample_s": time.perf_counter() - t0}


def distill_row(args: dict, out: str, overrides: list) -> dict:
    """Distill with megadmd's training code; score its generator; keep its validation curve."""
    from megadmd.config import resolve
    from megadmd.runner import run_train
    from megadmd.toy.builtin import TOY_SPEC
    from megadmd.toy.quality import sample

    extra = [f"model.teacher_path={args['teacher']}"]
    if args.get("pairs"):
        extra.append(f"dmd.regression.data_path={args['pairs']}")
    t0 = time.perf_counter()
    trainer = run_train(resolve(overrides=[f"output_dir={out}", "logging.tensorboard=false", *extra, *overrides]))
    seconds = time.perf_counter() - t0
    hooks = [getattr(h, "__self__", None) for h in trainer.hooks]
    quality = next((q for q in hooks if hasattr(q, "history")), None)
    # scored on the schedule it was trained for (a row may override dmd.denoising_steps), and with
    # the generator's EMA weights when the run keeps one
    labels, noise, renoise = _inputs(args, len(trainer.steps))
    ema = trainer.ema if trainer.ema is not None and trainer.ema.started else None
    with ema.applied() if ema else contextlib.nullcontext():
        x = sample(trainer.models.generator.module, "student", TOY_SPEC, labels, noise, renoise, trainer.models.dtype,
                   student_steps=trainer.steps)
    history = (quality.ema_history if ema else quality.history) if quality else []
    return {**_score(x, labels), "train_s": seconds, "trajectory": history, "scored": "ema" if ema else "live"}


def pairs_task(args: dict, out: str) -> dict:
    """The recipe's regression pairs, sampled once for every run (what megadmd train writes)."""
    from megadmd.config import resolve
    from megadmd.toy.builtin import TOY_PAIR_ODE_STEPS, TOY_PAIRS, write_toy_pairs

    d = resolve().dmd
    t0 = time.perf_counter()
    write_toy_pairs(out, args["teacher"], TOY_PAIRS, TOY_PAIR_ODE_STEPS, d.guidance_scale, d.cfg_form, d.flow_shift,
                    seed=resolve().train.seed)
    return {"pairs_s": time.perf_counter() - t0}


# --- the plan ----------------------------------------------------------------------------------
def plan(args) -> tuple[list, list]:
    """(reference and ladder rows, student rows): ``(name, function name, kwargs)``."""
    refs = [("true samples", "sampler_row", dict(kind="truth")),
            ("teacher@50, CFG", "sampler_row", dict(kind="teacher", steps=50)),
            ("teacher@3, CFG (student schedule)", "sampler_row", dict(kind="teacher_student_schedule")),
            ("teacher@50, no CFG", "sampler_row", dict(kind="teacher", steps=50, guidance=0.0)),
            ("teacher@3, no CFG (student schedule)", "sampler_row",
             dict(kind="teacher_student_schedule", guidance=0.0)),
            ("teacher weights in the 3-step DMD sampler (iteration 0)", "sampler_row", dict(kind="student"))]
    refs += [(f"teacher@{k}, CFG", "sampler_row", dict(kind="teacher", steps=k)) for k in STEP_LADDER if k != 50]
    students = [(DEFAULT, "distill_row", dict(overrides=[])), (FASTVIDEO[0], "distill_row", dict(overrides=FASTVIDEO[1])),
                (NO_GAN_ROW, "distill_row", dict(overrides=NO_GAN)), (LORA_ROW, "distill_row", dict(overrides=LORA_RECIPE))]
    if args.ablations:
        students += [(f"ablation: {k}", "distill_row", dict(overrides=v)) for k, v in ABLATIONS.items()]
    return refs, students


def load_references(path: str, common: dict, students: bool = False) -> dict:
    """Teacher-sampler rows of an earlier ``--out`` report on the same teacher, samples per class
    and seed: they are deterministic, so a recipe search need not sample the ladder again. With
    ``students`` its distilled rows too (``--only`` reruns some and keeps the rest)."""
    report = json.loads(Path(path).read_text())
    inputs = report.get("inputs", {})
    if {k: inputs.get(k) for k in ("teacher", "per_class", "seed")} != {k: common[k] for k in ("teacher", "per_class", "seed")}:
        raise SystemExit(f"--references {path} was measured on {inputs}, not on {common}")
    return {name: r for name, r in report["rows"].items() if students or "train_s" not in r}


def run(args) -> tuple[dict, float]:
    common = {"teacher": args.teacher, "per_class": args.per_class, "seed": args.seed}
    refs, students = plan(args)
    rows: dict = load_references(args.references, common, bool(args.only)) if args.references else {}
    if args.only:  # rerun the named students; every other row is the reference report's
        rows = {n: r for n, r in rows.items() if not any(o in n for o in args.only)}
        students = [s for s in students if any(o in s[0] for o in args.only)]
    reused = set(rows)
    refs_to_run = [r for r in refs if r[0] not in reused]
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(
            args.jobs, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        pairs_s = pool.submit(pairs_task, common, str(Path(tmp) / "pairs")).result()["pairs_s"]
        common["pairs"] = str(Path(tmp) / "pairs")
        futures = {}
        for i, (name, fn, kw) in enumerate(students + refs_to_run):  # the long runs first
            if fn == "distill_row":
                futures[name] = pool.submit(distill_row, common, str(Path(tmp) / f"run{i}"), kw["overrides"])
            else:
                futures[name] = pool.submit(sampler_row, common, **kw)
        for name in dict.fromkeys([r[0] for r in refs + students] + list(rows)):
            rows[name] = futures[name].result() if name in futures else {**rows[name], "reused": True}
            print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[name].items()
                                          if isinstance(v, float)), flush=True)
    return rows, pairs_s


# --- reading the rows --------------------------------------------------------------------------
def step_equivalence(rows: dict, student: dict) -> int | None:
    """The smallest K of the ladder whose teacher@K with CFG has precision >= the student's and
    Frechet <= the student's; None when no K up to 50 is (the student beats every rung)."""
    for k in STEP_LADDER:
        t = rows[f"teacher@{k}, CFG"]
        if t["precision"] >= student["precision"] and t["frechet"] <= student["frechet"]:
            return k
    return None


def check_targets(rows: dict, student: str = DEFAULT) -> list[str]:
    s, t50, t3 = rows[student], rows["teacher@50, CFG"], rows["teacher@3, no CFG (student schedule)"]
    fails = []
    if s["precision"] < t50["precision"] - 0.03:
        fails.append(f"precision {s['precision']:.3f} < teacher@50's {t50['precision']:.3f} - 0.03")
    if s["entropy"] < 0.95 or s["coverage"] < 1.0:
        fails.append(f"entropy {s['entropy']:.3f} < 0.95 or coverage {s['coverage']:.2f} < 1")
    if s["frechet"] > 2 * t50["frechet"] or s["frechet"] >= t3["frechet"]:
        fails.append(f"Frechet {s['frechet']:.4f} > 2 x teacher@50's {t50['frechet']:.4f} or >= teacher@3's "
                     f"(no CFG) {t3['frechet']:.4f}")
    k = step_equivalence(rows, s)
    if k is not None and k < 16:
        fails.append(f"step equivalence K = {k} < 16")
    return fails


def check_gan(rows: dict, with_gan: str = DEFAULT, without: str = NO_GAN_ROW) -> list[str]:
    """The GAN target: Frechet or entropy better by 20% relative, precision no more than 0.02 lower.
    A better entropy is a smaller gap to 1 (the even spread)."""
    g, n = rows[with_gan], rows[without]
    frechet_gain = 1 - g["frechet"] / n["frechet"]
    entropy_gain = 1 - (1 - g["entropy"]) / max(1 - n["entropy"], 1e-9)
    fails = []
    if max(frechet_gain, entropy_gain) < 0.2:
        fails.append(f"GAN: Frechet {n['frechet']:.4f} -> {g['frechet']:.4f} ({frechet_gain:+.0%}), entropy gap "
                     f"{1 - n['entropy']:.3f} -> {1 - g['entropy']:.3f} ({entropy_gain:+.0%}); need +20%")
    if g["precision"] < n["precision"] - 0.02:
        fails.append(f"GAN: precision {n['precision']:.3f} -> {g['precision']:.3f}")
    return fails


def markdown(rows: dict, names=None) -> str:
    lines = ["| sampler | precision | coverage | entropy | Frechet | nearest RMS | diversity | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for name in names or rows:
        r = rows[name]
        lines.append(f"| {name} | {r['precision']:.3f} | {r['coverage']:.2f} | {r['entropy']:.3f} | "
                     f"{r['frechet']:.4f} | {r['nearest_rms']:.3f} | {r['diversity']:.3f} | {r.get('train_s', 0):.0f} |")
    return "\n".join(lines)


def markdown_ladder(rows: dict, student: dict) -> str:
    lines = ["| sampler | forwards | precision | Frechet | entropy | at least as good as the student |",
             "|---|---|---|---|---|---|"]
    for k in STEP_LADDER:
        t = rows[f"teacher@{k}, CFG"]
        both = t["precision"] >= student["precision"] and t["frechet"] <= student["frechet"]
        lines.append(f"| teacher@{k}, CFG | {2 * k} | {t['precision']:.3f} | {t['frechet']:.4f} | "
                     f"{t['entropy']:.3f} | {'yes' if both else 'no'} |")
    lines.append(f"| student@3 | 3 | {student['precision']:.3f} | {student['frechet']:.4f} | {student['entropy']:.3f} | - |")
    return "\n".join(lines)


def markdown_trajectory(history: list) -> str:
    lines = ["| step | precision | coverage | entropy | Frechet | nearest RMS | diversity |", "|---|---|---|---|---|---|---|"]
    for step, r in history:
        lines.append(f"| {step} | {r['precision']:.3f} | {r['coverage']:.2f} | {r['entropy']:.3f} | "
                     f"{r['frechet']:.4f} | {r['nearest_rms']:.3f} | {r['diversity']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    from megadmd.monitoring.console import setup_console

    setup_console()  # the CLI's warning filters and log lines: this trains with run_train
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=None, help="default: the toy teacher shipped in the package")
    ap.add_argument("--per-class", type=int, default=256, help="evaluation samples per class")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    ap.add_argument("--no-ablations", dest="ablations", action="store_false")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--references", default=None,
                    help="reuse the teacher-sampler rows of this earlier --out report (same teacher, --per-class, --seed)")
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="rerun only the distilled rows whose name contains TEXT (repeatable); every other row, "
                         "students included, is taken from --references")
    args = ap.parse_args()
    # Bad input fails here, in one line, before half an hour of work.
    if args.per_class < 2 or args.jobs < 1:
        ap.error("--per-class must be at least 2 and --jobs at least 1")
    if args.only and not args.references:
        ap.error("--only needs --references: the rows it does not rerun come from that report")
    from megadmd.config import ConfigError
    from megadmd.models import resolve_model_dir
    from megadmd.toy.builtin import builtin_teacher_dir

    try:
        args.teacher = str(resolve_model_dir(args.teacher or builtin_teacher_dir(), what="--teacher"))
    except ConfigError as exc:
        ap.error(str(exc))
    if args.out and not Path(args.out).resolve().parent.is_dir():
        ap.error(f"--out: folder {Path(args.out).resolve().parent} does not exist")
    t0 = time.perf_counter()
    rows, pairs_s = run(args)
    total = time.perf_counter() - t0
    student = rows[DEFAULT]
    print(markdown(rows, [n for n in rows if not (n.startswith("teacher@") and n.endswith(", CFG")
                                                   and n not in ("teacher@50, CFG",))]))
    print(f"\nstep equivalence (teacher@K with CFG against the default student):\n{markdown_ladder(rows, student)}")
    k = step_equivalence(rows, student)
    print(f"smallest K at least as good on precision and Frechet: {k if k is not None else 'none up to 50'}")
    if student.get("trajectory"):  # a row reused from --references may have none
        print(f"\nthe default student during training (validation hook, 64 per class):\n"
              f"{markdown_trajectory(student['trajectory'])}")
    fails = check_targets(rows)
    gan_fails = check_gan(rows)
    print(f"\ntargets: {'met' if not fails else 'NOT met: ' + '; '.join(fails)}")
    print(f"GAN target: {'met' if not gan_fails else 'NOT met: ' + '; '.join(gan_fails)}")
    print(f"regression pairs: {pairs_s:.0f} s; whole benchmark: {total / 60:.1f} min with {args.jobs} jobs")
    if args.out:
        from megadmd.io_utils import atomic_write_text

        report = {"inputs": {"teacher": args.teacher, "per_class": args.per_class, "seed": args.seed},
                  "rows": rows, "total_s": total, "pairs_s": pairs_s, "step_equivalence": k,
                  "failed_targets": fails, "failed_gan_target": gan_fails}
        atomic_write_text(args.out, json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
