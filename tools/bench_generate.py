"""Benchmark: `megadmd generate`'s 3-step student with VSA, against the same student with dense
attention and against the teacher's 50 Euler steps with CFG (dense), where attention dominates.

Standalone script (the package never imports it). It saves a Wan DiT built from a config (default:
2 blocks, 2 heads of 128, 16 latent channels, patch 1x2x2; random weights, as speed does not
depend on them) with `save_pretrained`, writes a one-prompt random text dataset, and times the
functions `megadmd generate` runs (megadmd/generate.py: the generator loaded as `--attention vsa`
loads it, gates included; `sample_student`; `sample_baseline` for the teacher) on a latent of
`--latent-shape` (default 16,20,56,104: a 20x28x52 grid of 29,120 tokens, FastWan's 77x448x832):

- the student, 3 steps (1000, 757, 522), VSA at `--sparsity`;
- the student, 3 steps, dense attention;
- the teacher (the same weights, dense) for `--teacher-steps` Euler steps with CFG, one batched
  forward of 2 samples per step. Its 50-step time is **extrapolated** linearly from those steps:
  every step is the same forward on the same shape.

Each model first runs one untimed warm-up forward, as `megadmd generate` does. On a CPU shared
with other busy processes, `OMP_NUM_THREADS=1 ... --clock cpu` (this process's CPU time) gives
ratios that do not depend on how often the process was descheduled.

Example:
  OMP_NUM_THREADS=1 python tools/bench_generate.py --clock cpu          # 29,120 tokens, sparsity 0.9
  python tools/bench_generate.py --latent-shape 16,4,32,32 --teacher-steps 5   # a quick look
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from megadmd.data.make import write_random_dataset
from megadmd.generate import (GenerateOptions, _load_generator, _warm_up, load_conditions, sample_baseline,
                              sample_student, with_model_defaults)
from megadmd.models import build_wan, load_role_model
from megadmd.runner import compute_dtype

TEACHER_STEPS_QUOTED = 50


def bench_config(heads: int, head_dim: int, layers: int, channels: int) -> dict:
    return dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels,
                out_channels=channels, text_dim=64, freq_dim=64, ffn_dim=4 * heads * head_dim, num_layers=layers,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent-shape", default="16,20,56,104", help="C,F,H,W")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--backend", default="auto", help="VSA backend: auto | torch | flex | fastvideo")
    parser.add_argument("--teacher-steps", type=int, default=2, help="timed teacher steps (then extrapolated)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: this process's CPU time; meaningful with OMP_NUM_THREADS=1 on a CPU")
    return parser.parse_args(argv)


def timed(fn, clock, device) -> float:
    """Seconds of one call of ``fn`` (after a warm-up the caller ran)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def run(args, root: Path) -> dict:
    shape = tuple(int(x) for x in args.latent_shape.split(","))
    model = root / "model"
    build_wan(bench_config(args.heads, args.head_dim, args.layers, shape[0])).save_pretrained(str(model))
    write_random_dataset(root / "data", num_samples=1, latent_shape=None, text_len=512, text_dim=64)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(args.precision, device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    base = GenerateOptions(model=str(model), out=str(root / "out"), latent_shape=shape, embeds=str(root / "data"),
                           precision=args.precision, teacher_steps=args.teacher_steps, vsa_backend=args.backend)
    embeds, negative, _, image = load_conditions(base, device)
    seconds = {}
    for name, attention, sparsity in (("student_vsa_s", "vsa", args.sparsity), ("student_dense_s", "dense", None)):
        o = with_model_defaults(dataclasses.replace(base, attention=attention, vsa_sparsity=sparsity))
        net = _load_generator(o, dtype, device)
        _warm_up(net, embeds[0], o, dtype, device, image)
        seconds[name] = timed(lambda net=net, o=o: sample_student(net, embeds, o, dtype, device, image), clock, device)
        del net
    o = with_model_defaults(base)
    teacher = load_role_model(str(model), dtype, None).to(device).eval()
    _warm_up(teacher, embeds[0], o, dtype, device, image)
    teacher_step_s = timed(lambda: sample_baseline(teacher, embeds, negative, o, dtype, device, image),
                           clock, device) / args.teacher_steps
    teacher_s = teacher_step_s * TEACHER_STEPS_QUOTED
    return {"tokens": shape[1] * (shape[2] // 2) * (shape[3] // 2), "layers": args.layers, "heads": args.heads,
            "head_dim": args.head_dim, "sparsity": args.sparsity, "clock": args.clock,
            "threads": torch.get_num_threads(), **seconds, "teacher_step_s": teacher_step_s,
            "teacher_timed_steps": args.teacher_steps, "teacher_50_steps_s_extrapolated": teacher_s,
            "vsa_over_dense": seconds["student_dense_s"] / seconds["student_vsa_s"],
            "student_vsa_over_teacher_50": teacher_s / seconds["student_vsa_s"],
            "student_dense_over_teacher_50": teacher_s / seconds["student_dense_s"]}


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        r = run(args, Path(tmp))
    print(json.dumps(r, indent=1))
    print(f"| {r['tokens']} | {r['sparsity']} | {r['student_vsa_s']:.2f} | {r['student_dense_s']:.2f} "
          f"| {r['vsa_over_dense']:.2f}x | {r['teacher_step_s']:.2f} | {r['teacher_50_steps_s_extrapolated']:.1f} "
          f"| {r['student_vsa_over_teacher_50']:.1f}x | {r['student_dense_over_teacher_50']:.1f}x |")


if __name__ == "__main__":
    main()
