"""tools/gpu_check.py's verdicts and output: the benchmark targets evaluated on its measurements,
gpu_check.json and gpu_check.md (written atomically). Pure functions of the report dict."""
from __future__ import annotations

import json
from pathlib import Path

from megadmd.io_utils import atomic_write_text

# The issue's targets. Speedups are dense time / VSA time in the same run.
FWD_SPEEDUP, FWDBWD_SPEEDUP, TARGET_SPARSITY = 5.0, 3.0, 0.9
MEMORY_TOLERANCE = 0.10


def _target(name, required, measured, met, note=""):
    return {"name": name, "required": required, "measured": measured, "met": met, "note": note}


def _attention_targets(attention: dict, dry_run: bool) -> list:
    rows = [r for r in attention.get("rows", []) if r["sparsity"] == TARGET_SPARSITY]
    note = "dry run: toy sizes on a CPU, not a verdict" if dry_run else ""
    targets = []
    for tokens in sorted({r["tokens"] for r in rows}):
        for mode, need in (("fwd", FWD_SPEEDUP), ("fwdbwd", FWDBWD_SPEEDUP)):
            best = max((r for r in rows if r["tokens"] == tokens and r["mode"] == mode), key=lambda r: r["speedup"])
            label = "forward" if mode == "fwd" else "forward+backward"
            targets.append(_target(
                f"VSA {TARGET_SPARSITY} {label} vs dense, {tokens:,} tokens", f">= {need:g}x",
                f"{best['speedup']:.2f}x ({best['backend']})", best["speedup"] >= need, note))
    if not targets:
        targets.append(_target(f"VSA {TARGET_SPARSITY} vs dense attention", f">= {FWD_SPEEDUP:g}x / {FWDBWD_SPEEDUP:g}x",
                               "-", None, f"attention part {attention.get('status')}"))
    return targets


def _dmd_targets(dmd: dict, dry_run: bool) -> list:
    runs = dmd.get("runs", {})
    ok = {k: r for k, r in runs.items() if r.get("status") == "ok"}
    targets = []
    if len(ok) == 2:
        dense, vsa = ok["dense"]["mean_s_per_iter"], ok["vsa"]["mean_s_per_iter"]
        targets.append(_target("DMD iteration: VSA 0.9 faster than dense", "< dense",
                               f"{vsa:.2f} s vs {dense:.2f} s ({dense / vsa:.2f}x)", vsa < dense,
                               "dry run: toy sizes on a CPU, not a verdict" if dry_run else ""))
    else:
        targets.append(_target("DMD iteration: VSA 0.9 faster than dense", "< dense", "-", None, "a DMD run failed"))
    for label in ("dense", "vsa"):
        run = ok.get(label, {})
        name = f"DMD peak GPU memory within {MEMORY_TOLERANCE:.0%} of megadmd plan ({label})"
        if run.get("peak_device_gib") is None:
            why = "not measured without a GPU" if dry_run or run else f"the {label} run failed"
            targets.append(_target(name, f"+-{MEMORY_TOLERANCE:.0%}", "-", None, why))
            continue
        measured, plan = run["peak_device_gib"], run["plan_total_gib"]
        off = measured / plan - 1
        targets.append(_target(name, f"+-{MEMORY_TOLERANCE:.0%}",
                               f"{measured:.1f} GiB vs plan {plan:.1f} GiB ({off:+.1%})", abs(off) <= MEMORY_TOLERANCE,
                               "measured: peak reserved by PyTorch + memory outside it (CUDA context, NCCL)"))
    return targets


def evaluate_targets(report: dict) -> list:
    return _attention_targets(report["attention"], report["dry_run"]) + _dmd_targets(report["dmd"], report["dry_run"])


def _fmt(value, spec=".3f"):
    return "-" if value is None else format(value, spec)


def _attention_md(a: dict) -> list:
    lines = [f"## 1. Attention: dense SDPA vs VSA ({a.get('dtype')}, B=1, {a.get('heads')} heads x {a.get('head_dim')}, "
             f"best of {a.get('repeats')} after {a.get('warmup')} warm-up)", ""]
    lines.append(f"Backends run: {', '.join(a.get('backends', []))}; `auto` picks {a.get('auto_backend')}.")
    for name, why in a.get("skipped_backends", {}).items():
        lines.append(f"Not available: {name}: {why}")
    for name, diffs in a.get("check_vs_torch_max_abs", {}).items():
        lines.append(f"Check {name} vs torch (5x6x7 grid, sparsity 0.5), max abs diff: "
                     + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    lines += ["", "| tokens | grid | mode | backend | sparsity | topk | best_s | first_s | speedup |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in a.get("rows", []):
        topk = "-" if r["topk"] is None else f"{r['topk']}/{r['num_cubes']}"
        sparsity = "-" if r["sparsity"] is None else f"{r['sparsity']:.1f}"
        lines.append(f"| {r['tokens']:,} | {'x'.join(map(str, r['grid']))} | {r['mode']} | {r['backend']} | "
                     f"{sparsity} | {topk} | {r['best_s']:.4f} | {r['first_s']:.4f} | {r['speedup']:.2f}x |")
    return lines


def _dmd_md(report: dict) -> list:
    sizes = report["sizes"]
    lines = [f"## 2. One DMD iteration (generator + fake-score update), {sizes['wan_layers']}-block Wan, random "
             f"weights, latent {'x'.join(map(str, sizes['latent_shape']))}, {sizes['precision']}, one rank, ZeRO-3", "",
             "| run | VSA backend | optimizer | s / iteration | peak allocated GiB | peak reserved + outside GiB | "
             "plan GiB | plan - overhead GiB | build s |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in report["dmd"].get("runs", {}).items():
        if r.get("status") != "ok":
            lines.append(f"| {label} | {r.get('status')} | | | | | | | |")
            continue
        lines.append(
            f"| {label} | {r['vsa_backend'] or '-'} | {r['optimizer']} | {r['mean_s_per_iter']:.2f} | "
            f"{_fmt(r['peak_allocated_gib'], '.1f')} | {_fmt(r['peak_device_gib'], '.1f')} | {r['plan_total_gib']:.1f} | "
            f"{r['plan_total_gib'] - r['plan_overhead_gib']:.1f} | {r['build_s']:.0f} |")
    plans = {r.get("plan_command") for r in report["dmd"].get("runs", {}).values() if r.get("plan_command")}
    lines += [""] + [f"Plan: `{p}`" for p in sorted(plans)]
    return lines


def _generate_md(g: dict) -> list:
    lines = ["## 3. `megadmd generate`: the 3-step student vs the teacher with CFG, same model", ""]
    if g.get("status") != "ok":
        return lines + [f"{g.get('status')}: {str(g.get('error', '')).strip().splitlines()[-1:]}"]
    return lines + [f"`{g['command']}`", "", "| sampler | s / sample |", "|---|---|",
                    f"| student, {g['student_steps']} steps | {g['student_s_per_sample']:.3f} |",
                    f"| teacher, {g['teacher_steps']} steps + CFG | {g['teacher_s_per_sample']:.3f} |",
                    f"| speedup | {g['speedup']:.1f}x |"]


def markdown(report: dict) -> str:
    m = report["machine"]
    kind = "DRY RUN (CPU, toy sizes: no figure here is a GPU measurement)" if report["dry_run"] else "GPU run"
    lines = [f"# megadmd GPU check: {kind}", "",
             f"{m['device']}; Python {m['python']}, torch {m['torch']} (CUDA {m['cuda']}), triton {m['triton']}, "
             f"deepspeed {m['deepspeed']}, diffusers {m['diffusers']}; started {report['started']}, "
             f"{report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget.", "",
             "## Targets", "", "| target | required | measured | met | note |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['name']} | {t['required']} | {t['measured']} | {met} | {t['note']} |")
    lines += ["", "| part | status | seconds |", "|---|---|---|"]
    for part in ("prepare", "attention", "dmd", "generate"):
        lines.append(f"| {part} | {report[part]['status']} | {_fmt(report[part].get('seconds'), '.0f')} |")
    lines += [""] + _attention_md(report["attention"]) + [""] + _dmd_md(report) + [""]
    lines += _generate_md(report["generate"])
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "gpu_check.md", markdown(report))
