"""Functions run inside spawned ranks (importable, so torch.multiprocessing can pickle them)."""
from __future__ import annotations

import json

import torch


def train_and_record(rank: int, world: int, overrides: list, out_file: str) -> None:
    """Build a trainer from ``overrides``, record ZeRO partition sizes, train, and (rank 0) save
    the logged history and the full parameters of both trainable roles."""
    from megadmd.config import resolve
    from megadmd.runner import build_trainer
    from megadmd.zero import full_state_dict

    t = build_trainer(resolve(overrides=overrides))
    sizes = {}
    for role in ("generator", "fake_score"):
        e = t.models.engine(role)
        params = list(e.module.parameters())
        opt_numel = sum(int(f.numel()) for f in e.optimizer.fp32_partitioned_groups_flat)
        adam_numel = sum(int(s["exp_avg"].numel()) for s in e.optimizer.optimizer.state.values()
                         if "exp_avg" in s)
        sizes[role] = {
            "total": sum(int(p.ds_numel) for p in params),
            "local": sum(int(p.ds_tensor.numel()) for p in params),
            "optimizer_fp32_local": opt_numel,
            "adam_local_before_step": adam_numel,
        }
    t.train()
    for role in ("generator", "fake_score"):
        e = t.models.engine(role)
        sizes[role]["adam_local"] = sum(int(s["exp_avg"].numel()) for s in e.optimizer.optimizer.state.values()
                                        if "exp_avg" in s)
    states = {r: full_state_dict(t.models.engine(r).module) for r in ("generator", "fake_score")}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, sizes)
    if rank == 0:
        torch.save({"history": t.history, "states": states, "sizes": gathered}, out_file)
    t.writer.close()


def dump_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
