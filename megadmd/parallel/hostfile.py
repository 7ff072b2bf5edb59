"""Hostfiles for ``deepspeed --hostfile``: expand a Slurm node list and write ``host slots=N``.

``SLURM_JOB_NODELIST`` uses Slurm's compressed syntax: comma-separated names, each possibly with
bracketed ranges, e.g. ``gpu[01-03,07],login2`` or ``rack[1-2]-node[01-02]`` (several brackets
multiply out). ``scontrol show hostnames`` does the same expansion, but it exists only where
Slurm's client tools are installed; this works anywhere and is tested.

    python -m megadmd.parallel.hostfile --slots 8 > hostfile    # reads SLURM_JOB_NODELIST
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from ..config import ConfigError


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"unbalanced ']' in node list '{text}'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ConfigError(f"unbalanced '[' in node list '{text}'")
    parts.append("".join(cur))
    return [p for p in (x.strip() for x in parts) if p]


def _expand_range(spec: str) -> list[str]:
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise ConfigError(f"bad range '{item}' in a node list")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ConfigError(f"bad range '{item}' in a node list (end before start)")
        width = len(lo)  # zero padding follows the first number, as Slurm does
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(text: str) -> list[str]:
    """``gpu[01-03,07],login2`` -> ``['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login2']``."""
    hosts: list[str] = []
    for part in _split_top_level(text):
        names = [""]
        for literal, rng in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", part):
            suffixes = _expand_range(rng) if rng else [""]
            names = [n + literal + s for n in names for s in suffixes]
        hosts += names
    if not hosts:
        raise ConfigError("the node list is empty")
    if len(set(hosts)) != len(hosts):
        raise ConfigError(f"the node list names a host twice: {text}")
    return hosts


def hostfile_text(hosts: list[str], slots: int) -> str:
    if slots < 1:
        raise ConfigError(f"--slots must be >= 1, got {slots}")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="write a deepspeed hostfile from a Slurm node list")
    ap.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST"),
                    help="default: $SLURM_JOB_NODELIST")
    ap.add_argument("--slots", type=int, required=True, help="processes (GPUs) per node")
    args = ap.parse_args(argv)
    try:
        if not args.nodelist:
            raise ConfigError("no node list: set SLURM_JOB_NODELIST or pass --nodelist")
        sys.stdout.write(hostfile_text(expand_nodelist(args.nodelist), args.slots))
    except ConfigError as exc:
        print(f"megadmd: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
