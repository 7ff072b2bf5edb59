"""The quality benchmark, CI-sized: `megadmd train` on its built-in default (the shipped toy
teacher, 125 iterations) must produce a 3-step student that beats the teacher's own 3-step
sampler with CFG by a clear margin, on precision and on the Frechet distance, measured by the
same metric code that the training run logs to TensorBoard (tools/quality_benchmark.py is the
full version)."""
import subprocess
import sys

import torch

from tests.helpers import cli_env


def teacher_at_3_steps(per_class: int, seed: int) -> dict:
    from megadmd.models import load_wan
    from megadmd.toy.builtin import TOY_SPEC, builtin_teacher_dir
    from megadmd.toy.metrics import evaluate
    from megadmd.toy.quality import eval_inputs, sample

    teacher = load_wan(str(builtin_teacher_dir())).eval()
    labels, noise, renoise = eval_inputs(TOY_SPEC, per_class, seed, torch.device("cpu"))
    samples = sample(teacher, "teacher_student_schedule", TOY_SPEC, labels, noise, renoise, guidance_scale=3.5)
    return evaluate(samples, labels, TOY_SPEC)


def test_default_train_distills_the_toy_teacher_past_its_own_3_step_sampler(tmp_path):
    """`megadmd train` with no arguments at all (the README's first command), in a fresh folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = subprocess.run([sys.executable, "-m", "megadmd", "train"], cwd=tmp_path, env=cli_env(),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "megadmd-tiny"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000125"
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    curve = {tag: {e.step: e.value for e in acc.Scalars(f"quality/{tag}")}
             for tag in ("precision", "coverage", "frechet")}
    assert sorted(curve["precision"]) == [1, 25, 50, 75, 100, 125]
    assert [e.step for e in acc.Images("quality/samples")][-1] == 125
    # the hook's evaluation set: 64 samples per class, seed 42 (megadmd/toy/quality.py)
    ref = teacher_at_3_steps(per_class=64, seed=42)
    student = {k: v[125] for k, v in curve.items()}
    print(f"student@3 after 125 iterations: {student}; teacher@3 with CFG: {ref}")
    assert student["precision"] >= max(2 * ref["precision"], ref["precision"] + 0.3), (student, ref)
    assert student["frechet"] <= 0.75 * ref["frechet"], (student, ref)
    assert student["coverage"] >= 0.9, student
    # and distillation is what got it there: better precision than the generator's first sample
    assert student["precision"] > curve["precision"][1] + 0.03, curve["precision"]
