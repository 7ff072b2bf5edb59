"""GPU acceptance run: VSA kernels against dense attention, one DMD iteration of Wan2.1 1.3B, and
`megadmd generate` 3 steps against 50 steps with CFG. Writes gpu_check.json and gpu_check.md.

Run it through tools/gpu_check.sh (which can first install wheels made by tools/gpu_wheels.sh on
an offline machine). The three parts, each in its own child process so that GPU memory, DeepSpeed
and torch.compile state start clean:

1. attention: dense SDPA (the fused flash kernel on a GPU) against VSA at sparsity 0.8 and 0.9,
   forward and forward+backward, bf16, 12 heads x 128, at 29,120 (20x28x52) and 32,760 (21x30x52)
   tokens, for every VSA backend that can run; first each backend's output and gradients against
   the torch backend's on a small irregular grid.
2. dmd: one full DMD iteration (the generator update and the fake-score update) of the Wan2.1 1.3B
   architecture with random weights, bf16, one rank, ZeRO-3, activation checkpointing, latents
   16x21x60x104 (81x480x832 video, a 21x30x52 token grid), dense against VSA 0.9: seconds per
   iteration and peak GPU memory next to `megadmd plan`'s prediction. The roles are built by
   megadmd's own `build_trainer`, so the optimizer is the client torch AdamW of roles.py, not a
   DeepSpeed CUDA op (nothing is compiled; a DeepSpeed wheel built with DS_BUILD_OPS=0 works).
3. generate: `megadmd generate` (the CLI, as users call it) with --compare-teacher: the 3-step
   student against the 50-step teacher with CFG, on the same model.

`--dry-run` runs the same code on the CPU at toy sizes (a 2-block Wan, a 5x6x7 token grid with
partial cubes, the triton backend under Triton's interpreter, which gpu_check.sh switches on, and
a 6-step teacher) and writes the same fields; the speed targets are then evaluated but mean nothing, and peak GPU
memory is not measured. A part that fails or runs out of the time budget is recorded as such and
the others still run; the exit status is 1 if any part did not finish.

    bash tools/gpu_check.sh --out gpu-check            # on a GPU machine
    bash tools/gpu_check.sh --out /tmp/gc --dry-run    # on a CPU, in about a minute
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from gpu_check_report import evaluate_targets, write_report  # the script's folder

# Each part runs in its own child process, so that GPU memory, DeepSpeed's process-wide state and
# torch.compile caches start clean: the dense and the VSA training runs are separate parts.
PARTS = ("prepare", "attention", "dmd-dense", "dmd-vsa", "generate")
DMD_SPARSITY = {"dmd-dense": 0.0, "dmd-vsa": 0.9}
BUDGET_S = 480  # the limit: under 8 minutes on one GPU

# Wan2.1 1.3B at 81 x 480 x 832: 16 x 21 x 60 x 104 latents -> a 21 x 30 x 52 token grid.
LATENT_SHAPE = (16, 21, 60, 104)
# The dry run's toy Wan: two blocks, 2 heads x 16, a 5 x 6 x 7 token grid (partial cubes).
TOY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
    text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
)
TOY_LATENT_SHAPE = (4, 5, 12, 14)


def sizes(dry_run: bool) -> dict:
    """Everything that differs between a GPU run and a dry run."""
    if dry_run:
        # One timed round and no warm-up: the dry run checks the code, its times mean nothing.
        return dict(device="cpu", dtype="bfloat16", grids=["5x6x7"], heads=2, head_dim=16, repeats=1, warmup=0,
                    wan_config=TOY_WAN, latent_shape=TOY_LATENT_SHAPE, text_len=16, precision="fp32",
                    iterations=1, warmup_iterations=0, teacher_steps=6)
    from megadmd.presets import WAN21_1_3B_CONFIG

    return dict(device="cuda", dtype="bfloat16", grids=["29k", "32k"], heads=12, head_dim=128, repeats=5, warmup=2,
                wan_config=WAN21_1_3B_CONFIG, latent_shape=LATENT_SHAPE, text_len=512, precision="bf16",
                iterations=2, warmup_iterations=1, teacher_steps=50)


# --- the parts (each runs in its own process: `gpu_check.py --part NAME`) ---------------------------


def part_prepare(work: Path, s: dict) -> dict:
    """A random-weight model (saved once, bf16 on a GPU) and a 2-sample random dataset."""
    from megadmd.data.make import write_random_dataset
    from megadmd.models import build_wan

    start = time.perf_counter()
    device = torch.device(s["device"] if torch.cuda.is_available() or s["device"] == "cpu" else "cpu")
    with device:  # initializing 1.3B parameters is seconds on a GPU, a minute on a CPU
        model = build_wan(s["wan_config"], seed=0)
    model.to(device="cpu", dtype=torch.bfloat16 if s["precision"] == "bf16" else torch.float32)
    model.save_pretrained(str(work / "model"))
    params = sum(p.numel() for p in model.parameters())
    del model
    c, f, h, w = s["latent_shape"]
    write_random_dataset(work / "data", num_samples=2, latent_shape=[c, f, h, w], text_len=s["text_len"],
                         text_dim=s["wan_config"]["text_dim"], seed=0)
    return {"status": "ok", "parameters": params, "seconds": time.perf_counter() - start}


def part_attention(work: Path, s: dict) -> dict:
    """Dense SDPA against every available VSA backend (tools/bench_attention.py's timing loop)."""
    from bench_attention import bench_grid, check_backends, parse_args, parse_grid, pick_backends

    from megadmd.attention.vsa import VSA_BACKENDS, resolve_vsa_backend, vsa_topk
    from megadmd.attention.vsa_tiling import cube_tiling

    args = parse_args(["--device", s["device"], "--dtype", s["dtype"], "--heads", str(s["heads"]),
                       "--head-dim", str(s["head_dim"]), "--sparsities", "0.8,0.9", "--repeats", str(s["repeats"]),
                       "--warmup", str(s["warmup"])])
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    backends = pick_backends("available", device)
    skipped = {}
    for name in VSA_BACKENDS:
        if name not in backends:
            try:
                resolve_vsa_backend(name, device)
            except RuntimeError as err:
                skipped[name] = str(err)
    check = check_backends(args, backends, device, dtype)
    rows = []
    for grid in (parse_grid(g) for g in s["grids"]):
        num_cubes = cube_tiling(grid).num_cubes
        for mode in ("fwd", "fwdbwd"):
            cases = bench_grid(args, grid, mode, backends, device, dtype)
            dense_s = next(c.best_s for c in cases if c.label == "dense")
            for case in cases:
                rows.append({
                    "grid": list(grid), "tokens": math.prod(grid), "mode": mode, "backend": case.label,
                    "sparsity": case.sparsity,
                    "topk": None if case.sparsity is None else vsa_topk(case.sparsity, num_cubes),
                    "num_cubes": num_cubes, "best_s": case.best_s, "first_s": case.first_s,
                    "speedup": dense_s / case.best_s,
                })
    return {"status": "ok", "dtype": args.dtype, "heads": args.heads, "head_dim": args.head_dim,
            "repeats": args.repeats, "warmup": args.warmup, "backends": backends, "skipped_backends": skipped,
            "auto_backend": resolve_vsa_backend("auto", device), "check_vs_torch_max_abs": check, "rows": rows}


def _dmd_overrides(work: Path, s: dict, sparsity: float, backend: str) -> list:
    overrides = [
        "preset=wan2.1-t2v-1.3b", f"model.teacher_path={work / 'model'}", f"data.path={work / 'data'}",
        f"output_dir={work / f'run-{sparsity}'}", f"model.precision={s['precision']}", f"data.text_len={s['text_len']}",
        "dmd.generator_update_interval=1",  # both phases in every iteration
        "train.micro_batch_size=1", "train.max_steps=1000", "logging.tensorboard=false",
        "logging.interval_steps=1000", "checkpoint.interval_steps=0", "validation.interval_steps=0",
    ]
    if sparsity > 0:
        overrides += [f"attention.vsa_sparsity={sparsity}", f"attention.vsa_backend={backend}"]
    return overrides


def _device_memory(device: torch.device) -> dict:
    """Peak allocated and reserved by PyTorch, and the device memory PyTorch does not own (the
    CUDA context and NCCL), all GiB. None on a CPU: this run measures GPU memory only."""
    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None, "context_gib": None, "peak_device_gib": None}
    gib = float(1 << 30)
    free, total = torch.cuda.mem_get_info(device)
    reserved_now = torch.cuda.memory_reserved(device)
    context = (total - free - reserved_now) / gib
    peak_reserved = torch.cuda.max_memory_reserved(device) / gib
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib, "peak_reserved_gib": peak_reserved,
            "context_gib": context, "peak_device_gib": peak_reserved + context}


def _plan(s: dict, sparsity: float, ema: bool, device: torch.device) -> dict:
    """`megadmd plan`'s prediction for this run (the library function the command calls)."""
    from megadmd.plan.memory import FIXED_OVERHEAD_GIB, FRAGMENTATION, plan_memory

    gpu_gib = torch.cuda.get_device_properties(device).total_memory / (1 << 30) if device.type == "cuda" else 80.0
    model = "wan2.1-t2v-1.3b" if s["wan_config"]["num_layers"] == 30 else s["wan_config"]
    plan = plan_memory(model, latent_shape=tuple(s["latent_shape"]), nodes=1, gpus_per_node=1, micro_batch=1,
                       vsa_sparsity=sparsity, ema=ema, gpu_memory_gib=gpu_gib, precision=s["precision"],
                       text_len=s["text_len"], device=device.type)
    overhead = FIXED_OVERHEAD_GIB + FRAGMENTATION * plan.phases[plan.peak_phase]
    video = "81,480,832"
    command = (f"megadmd plan --preset wan2.1-t2v-1.3b --video-size {video} --nodes 1 --gpus-per-node 1 "
               f"--activation-checkpointing --vsa-sparsity {sparsity:g} {'--ema' if ema else '--no-ema'} "
               f"--precision bf16 --gpu-memory-gib {gpu_gib:.0f}")
    return {"plan_total_gib": plan.gpu_total_gib, "plan_overhead_gib": overhead, "plan_peak_phase": plan.peak_phase,
            "plan_command": command if model == "wan2.1-t2v-1.3b" else "plan_memory(toy config, device='cpu')"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part_dmd(work: Path, s: dict, sparsity: float) -> dict:
    """Build the three roles with megadmd's build_trainer and time full iterations (both phases)."""
    from megadmd.attention.vsa import resolve_vsa_backend
    from megadmd.config import resolve
    from megadmd.parallel.init import shutdown_distributed
    from megadmd.runner import build_trainer

    device = torch.device(s["device"])
    # On a GPU "auto" (FastVideo, else triton, else flex); in the dry run the triton kernels
    # under the interpreter, so that the run goes through them inside a training step.
    backend = "triton" if s["device"] == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" else "auto"
    start = time.perf_counter()
    trainer = build_trainer(resolve(overrides=_dmd_overrides(work, s, sparsity, backend)))
    build_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the plan models training, not the model load
    times = []
    for step in range(1, s["warmup_iterations"] + s["iterations"] + 1):
        _sync(device)
        t0 = time.perf_counter()
        trainer.train_step(step)
        _sync(device)
        if step > s["warmup_iterations"]:
            times.append(time.perf_counter() - t0)
    engine = trainer.models.generator
    result = {
        "status": "ok", "sparsity": sparsity, "build_s": build_s, "s_per_iter": times,
        "mean_s_per_iter": sum(times) / len(times),
        "vsa_backend": resolve_vsa_backend(backend, device) if sparsity > 0 else None,
        "optimizer": type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__,
        "zero_stage": engine.zero_optimization_stage(), "precision": s["precision"],
        "activation_checkpointing": dict(vars(trainer.cfg.model.activation_checkpointing)),
        **_device_memory(device), **_plan(s, sparsity, bool(trainer.cfg.ema.decay), device),
    }
    shutdown_distributed()
    return result


def part_generate(work: Path, s: dict) -> dict:
    """`megadmd generate --compare-teacher` as a user runs it; its timing.json holds the figures."""
    out = work / "generate"
    command = [sys.executable, "-m", "megadmd", "generate", "--model", str(work / "model"),
               "--compare-teacher", str(work / "model"), "--embeds", str(work / "data"),
               "--latent-shape", ",".join(map(str, s["latent_shape"])), "--precision", s["precision"],
               "--teacher-steps", str(s["teacher_steps"]), "-o", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"status": "failed", "error": proc.stderr[-3000:], "command": " ".join(command[1:])}
    timing = json.loads((out / "timing.json").read_text())
    return {"status": "ok", "command": "megadmd " + " ".join(command[3:]), **timing}


# --- the driver ---------------------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    cuda = device == "cuda" and torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)",
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / (1 << 30) if cuda else None,
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        **{name: version(name) for name in ("triton", "deepspeed", "diffusers", "transformers", "fastvideo-kernel")},
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


def run_part(name: str, args, deadline: float, logs: Path) -> dict:
    """Run one part in a child process with what is left of the budget; its JSON, or why not.

    The child leads its own process group, so that a timeout also stops what it started (the
    `megadmd generate` process, compile workers) and frees the GPU for the next part."""
    result_file = args.work / f"part-{name}.json"
    command = [sys.executable, __file__, "--part", name, "--out", str(args.out), "--work", str(args.work)]
    command += ["--dry-run"] if args.dry_run else []
    remaining = deadline - time.monotonic()
    if remaining < 10:
        return {"status": "skipped", "error": f"the {args.budget_s:.0f} s budget was spent before this part"}
    # Each part is a one-rank world of its own: launcher variables of an enclosing job (a Slurm
    # step, a test process that already holds a process group and its port) must not leak in.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    if args.dry_run:
        # Toy sizes on a CPU are thousands of tiny ops; with several threads each one ends in an
        # OpenMP barrier, which on a shared machine waits out other processes' time slices.
        env["OMP_NUM_THREADS"] = "1"
    start = time.monotonic()
    with open(logs / f"{name}.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            returncode = proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"status": "timeout", "seconds": time.monotonic() - start,
                    "error": f"stopped at the {args.budget_s:.0f} s budget; see logs/{name}.log"}
    if returncode != 0 or not result_file.is_file():
        tail = (logs / f"{name}.log").read_text()[-3000:]
        return {"status": "failed", "seconds": time.monotonic() - start, "error": tail}
    result = json.loads(result_file.read_text())
    result["seconds"] = time.monotonic() - start
    return result


def drive(args) -> int:
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.monotonic()
    deadline = t0 + args.budget_s
    s = sizes(args.dry_run)
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"schema": 1, "dry_run": args.dry_run, "started": started, "budget_s": args.budget_s,
              "machine": machine_info(s["device"]),
              "sizes": {k: v for k, v in s.items() if k != "wan_config"} | {"wan_layers": s["wan_config"]["num_layers"]}}
    for name in PARTS:
        print(f"gpu_check: {name} ...", flush=True)
        report[name] = run_part(name, args, deadline, logs)
        print(f"gpu_check: {name}: {report[name]['status']} ({report[name].get('seconds', 0):.0f} s)", flush=True)
    report["dmd"] = {"runs": {"dense": report.pop("dmd-dense"), "vsa": report.pop("dmd-vsa")}}
    report["dmd"]["status"] = "ok" if all(r["status"] == "ok" for r in report["dmd"]["runs"].values()) else "failed"
    report["dmd"]["seconds"] = sum(r.get("seconds", 0.0) for r in report["dmd"]["runs"].values())
    report["wall_s"] = time.monotonic() - t0
    report["targets"] = evaluate_targets(report)
    write_report(report, args.out)
    print(f"gpu_check: wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'} "
          f"in {report['wall_s']:.0f} s", flush=True)
    return 0 if all(report[p]["status"] == "ok" for p in ("prepare", "attention", "dmd", "generate")) else 1


def run_one_part(args) -> None:
    s = sizes(args.dry_run)
    if args.part == "prepare":
        result = part_prepare(args.work, s)
    elif args.part == "attention":
        result = part_attention(args.work, s)
    elif args.part in DMD_SPARSITY:
        result = part_dmd(args.work, s, DMD_SPARSITY[args.part])
    elif args.part == "generate":
        result = part_generate(args.work, s)
    else:
        raise SystemExit(f"unknown part {args.part!r}; parts: {', '.join(PARTS)}")
    (args.work / f"part-{args.part}.json").write_text(json.dumps(result, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md, logs/")
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, Triton's interpreter")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="stop parts still running after this")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: OUT/work)")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part
    args = parser.parse_args(argv)
    args.work = args.work or args.out / "work"
    if args.part is not None:
        run_one_part(args)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device; run with --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
