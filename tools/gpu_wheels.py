"""Download, on a connected machine, the wheels an offline GPU machine lacks to run megadmd.

The offline machine is assumed to have Python, torch with CUDA, triton, transformers, peft,
pyarrow and tensorboard (`--present`), but not deepspeed or diffusers. This script works out
which packages megadmd needs beyond those, by reading their metadata (Requires-Dist) for the
target Python and platform, and fetches exactly those into DIR:

- every package in the closure of megadmd's install_requires, minus the closure of the packages
  present (and minus torch, triton, nvidia-* and cuda-*, which come with torch's CUDA build);
- deepspeed as a wheel built here from its sdist with DS_BUILD_OPS=0 (pure Python; its CUDA ops
  would be compiled on first use, and megadmd uses none: its optimizer is torch's AdamW). PyPI has
  no current deepspeed wheel: `pip download --only-binary=:all: deepspeed` finds only 0.3.1.dev5;
- setuptools and wheel, so that `pip install --no-index -e .` can build megadmd offline.

It writes DIR/requirements.txt (megadmd's requirements without torch) and DIR/wheels.json (what
was fetched, for which target). Then, on the GPU machine: `bash tools/gpu_check.sh --wheels DIR`.

    bash tools/gpu_wheels.sh wheels/                      # cp312, manylinux_2_28 x86_64
    bash tools/gpu_wheels.sh wheels/ --list               # only print what it would fetch
    bash tools/gpu_wheels.sh wheels/ --python-version 3.11 --platform manylinux_2_28_aarch64

Known limit: the present packages' versions on the offline machine are not known here, so if a
fetched package needs a newer version of a present one (say huggingface-hub), the offline
install stops with pip's "No matching distribution" naming it; add it with --also NAME.
"""
from __future__ import annotations

import argparse
import configparser
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.markers import Marker  # noqa: F401
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PRESENT = ["torch==2.11.*", "triton==3.6.*", "transformers", "peft", "pyarrow", "tensorboard"]
# Shipped with torch's CUDA wheels or the CUDA toolkit; never fetched.
NEVER = ("torch", "triton")
NEVER_PREFIXES = ("nvidia-", "cuda-")
BUILD_TOOLS = ["setuptools>=68", "wheel"]  # pyproject.toml's build-system requires


def megadmd_requirements() -> list[str]:
    """install_requires of setup.cfg, without torch (the machine's own CUDA build)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    return [line for line in lines if canonicalize_name(Requirement(line).name) != "torch"]


def marker_env(python_version: str, platform_tag: str) -> dict:
    machine = "aarch64" if "aarch64" in platform_tag else "x86_64"
    return {"python_version": python_version, "python_full_version": f"{python_version}.0", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": machine,
            "platform_release": "", "platform_version": "", "implementation_name": "cpython",
            "implementation_version": f"{python_version}.0", "platform_python_implementation": "CPython"}


def expand_platforms(platforms: list[str]) -> list[str]:
    """manylinux_2_Y_ARCH -> every glibc tag from 2_Y down to 2_17 (= manylinux2014, which pip
    itself extends to 2010 and 1): pip (23.x) does not imply older glibc tags by itself, so
    wheels tagged only manylinux2014 (most of them) would not match manylinux_2_28 alone."""
    tags = []
    for tag in platforms:
        parts = tag.split("_", 3)  # manylinux, 2, Y, ARCH
        if len(parts) == 4 and parts[0] == "manylinux" and parts[1] == "2" and parts[2].isdigit():
            tags += [f"manylinux_2_{y}_{parts[3]}" for y in range(int(parts[2]), 16, -1)]
            tags.append(f"manylinux2014_{parts[3]}")
        else:
            tags.append(tag)
    return list(dict.fromkeys(tags))


def skipped(name: str) -> bool:
    return name in NEVER or name.startswith(NEVER_PREFIXES)


class Target:
    """pip's flags and the marker environment for the offline machine's Python and platform."""

    def __init__(self, python_version: str, platforms: list[str]):
        self.env = marker_env(python_version, platforms[0])
        self.flags = ["--python-version", python_version, "--implementation", "cp", "--only-binary=:all:"]
        for tag in expand_platforms(platforms):
            self.flags += ["--platform", tag]

    def wants(self, req: Requirement, extras: set) -> bool:
        if req.marker is None:
            return True
        return any(req.marker.evaluate({**self.env, "extra": extra}) for extra in extras | {""})


def pip(*args: str, quiet: bool = True) -> None:
    command = [sys.executable, "-m", "pip", *args] + (["--quiet"] if quiet else [])
    result = subprocess.run(command, capture_output=quiet, text=True)
    if result.returncode != 0:
        raise SystemExit(f"gpu_wheels: pip {' '.join(args[:3])} ... failed:\n{result.stderr[-3000:]}")


def metadata(requirements: list[str], flags: list[str]) -> list[dict]:
    """Name, version, file and Requires-Dist of what pip would pick for each requirement, read
    from the index's metadata (pip install --dry-run --report): no wheel is downloaded."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip("install", "--dry-run", "--no-deps", "--ignore-installed", "--target", str(Path(tmp) / "t"),
            "--report", str(report), *flags, *requirements)
        items = json.loads(report.read_text())["install"]
    return [{"name": canonicalize_name(i["metadata"]["name"]), "version": i["metadata"]["version"],
             "file": i["download_info"]["url"].rsplit("/", 1)[-1],
             "requires": i["metadata"].get("requires_dist") or []} for i in items]


def closure(roots: list[str], target: Target, stop: set, pinned: dict | None = None) -> dict:
    """Every package reachable from `roots` through Requires-Dist for the target, walked a level
    at a time (one pip call per level), not entering names in `stop`. `pinned` maps a name to
    (requirement, pip flags) for packages resolved another way (deepspeed, from its sdist)."""
    pinned = pinned or {}
    pending = {canonicalize_name(Requirement(r).name): (Requirement(r), set(Requirement(r).extras)) for r in roots}
    pending = {name: value for name, value in pending.items() if name not in stop}
    found: dict = {}
    while pending:
        plain = [str(req) for name, (req, _) in pending.items() if name not in pinned]
        entries = metadata(plain, target.flags) if plain else []
        for name in [n for n in pending if n in pinned]:
            entries += metadata([pinned[name][0]], pinned[name][1])
        following = {}
        for entry in entries:
            extras = pending[entry["name"]][1] | set(found.get(entry["name"], {}).get("extras", []))
            found[entry["name"]] = {**entry, "extras": sorted(extras)}
            for text in entry["requires"]:
                req = Requirement(text)
                name = canonicalize_name(req.name)
                if skipped(name) or name in stop or not target.wants(req, extras):
                    continue
                if name in found and set(req.extras) <= set(found[name]["extras"]):
                    continue
                req.marker = None  # evaluated above
                if name in following:  # several parents: all their version ranges at once
                    earlier, earlier_extras = following[name]
                    req.specifier &= earlier.specifier
                    req.extras |= earlier_extras
                following[name] = (req, set(req.extras))
        pending = following
    return found


def plan(args) -> tuple[dict, dict, list]:
    """(needed packages, present names, megadmd requirements): what DIR must hold."""
    target = Target(args.python_version, args.platform)
    print(f"gpu_wheels: reading the metadata of what is present ({', '.join(args.present)}) ...", flush=True)
    present = closure(args.present, target, stop=set())
    requirements = megadmd_requirements() + list(args.also)
    ds_req = next(r for r in requirements if canonicalize_name(Requirement(r).name) == "deepspeed")
    if args.deepspeed_version:
        ds_req = f"deepspeed=={args.deepspeed_version}"
    # deepspeed's metadata comes from its sdist (pure Python: no target flags needed).
    pinned = {"deepspeed": (ds_req, ["--no-binary", "deepspeed"])}
    print("gpu_wheels: reading the metadata of megadmd's requirements ...", flush=True)
    needed = closure(requirements, target, stop=set(present), pinned=pinned)
    return needed, present, requirements


def fetch(needed: dict, args, target: Target) -> list[str]:
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = needed.pop("deepspeed", None)
    if ds is not None:
        print(f"gpu_wheels: building deepspeed {ds['version']} from its sdist (DS_BUILD_OPS=0) ...", flush=True)
        env = {**os.environ, "DS_BUILD_OPS": "0"}
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir",
                        "--no-binary", "deepspeed", f"deepspeed=={ds['version']}", "-w", str(out)], env=env, check=True)
    pins = [f"{name}=={entry['version']}" for name, entry in sorted(needed.items())]
    print(f"gpu_wheels: downloading {len(pins)} wheels and the build tools ...", flush=True)
    pip("download", "--no-deps", "-d", str(out), *target.flags, *pins, *BUILD_TOOLS)
    if ds is not None:
        needed["deepspeed"] = ds
    return sorted(p.name for p in out.glob("*.whl"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("dir", help="folder for the wheels (created; git-ignored when it is wheels/ here)")
    parser.add_argument("--python-version", default="3.12", help="the offline machine's Python (default 3.12)")
    parser.add_argument("--platform", action="append", default=None,
                        help="pip platform tag(s), default manylinux_2_28_x86_64 (older manylinux tags are "
                             "implied; torch's CUDA 13 wheels need glibc 2.28 anyway)")
    parser.add_argument("--present", nargs="+", default=PRESENT, help=f"installed there (default {' '.join(PRESENT)})")
    parser.add_argument("--also", nargs="+", default=[], help="more requirements to fetch with their dependencies")
    parser.add_argument("--deepspeed-version", default=None, help="default: the newest release megadmd accepts")
    parser.add_argument("--list", action="store_true", help="print what would be fetched, download nothing")
    args = parser.parse_args(argv)
    args.platform = args.platform or ["manylinux_2_28_x86_64"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    target = Target(args.python_version, args.platform)
    needed, present, requirements = plan(args)
    print(f"\ngpu_wheels: for Python {args.python_version} on {', '.join(args.platform)}; present there: "
          f"{len(present)} packages ({', '.join(sorted(present))})")
    print(f"gpu_wheels: megadmd needs {len(needed)} more:")
    for name, entry in sorted(needed.items()):
        source = "built from the sdist, DS_BUILD_OPS=0" if name == "deepspeed" else entry["file"]
        print(f"  {name} {entry['version']}  ({source})")
    if args.list:
        return 0
    files = fetch(dict(needed), args, target)
    out = Path(args.dir)
    (out / "requirements.txt").write_text("\n".join(requirements) + "\n")
    manifest = {"made": time.strftime("%Y-%m-%d %H:%M:%S"), "python_version": args.python_version,
                "platforms": args.platform, "present": args.present, "present_closure": sorted(present),
                "packages": {n: e["version"] for n, e in sorted(needed.items())}, "build_tools": BUILD_TOOLS,
                "files": files, "requirements": requirements}
    (out / "wheels.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"gpu_wheels: {len(files)} wheels in {out}; on the GPU machine: bash tools/gpu_check.sh --wheels {out} --out DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
