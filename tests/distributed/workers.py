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


def ulysses_forward_backward(rank: int, world: int, latent_shape: list, out_file: str) -> None:
    """sp=world Wan forward/backward against the single-process model, inside each rank."""
    from megadmd.attention.processor import configure_attention
    from megadmd.models import build_wan
    from megadmd.parallel.init import init_distributed
    from megadmd.parallel.state import ParallelState
    from tests.helpers import TEST_WAN_CONFIG

    from megadmd.parallel.ulysses import head_to_seq, seq_to_head

    init_distributed("gloo")
    ps = ParallelState.build(sp_size=world)
    # the all-to-all layouts, exactly: [N, B, S, H, D] with S and H split over the ranks
    full = torch.arange(2 * 8 * 4 * 3, dtype=torch.float32).reshape(2, 1, 8, 4, 3)
    s, h = 8 // world, 4 // world
    local = full[:, :, rank * s:(rank + 1) * s]
    heads = seq_to_head(local, ps.sp_group, world)
    layouts_ok = (torch.equal(heads, full[:, :, :, rank * h:(rank + 1) * h])
                  and torch.equal(head_to_seq(heads, ps.sp_group, world), local))
    ref = build_wan(TEST_WAN_CONFIG, seed=0)
    sp_model = build_wan(TEST_WAN_CONFIG, seed=0)
    ctx = configure_attention(sp_model, sp_group=ps.sp_group, sp_size=ps.sp_size, sp_rank=ps.sp_rank)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *latent_shape, generator=g)
    t = torch.tensor([250.0, 900.0])
    text = torch.randn(2, 6, 32, generator=g)
    w = torch.randn(2, *latent_shape, generator=g)
    results = {}
    for name, model in (("ref", ref), ("sp", sp_model)):
        out = model(x, t, text, return_dict=False)[0]
        (out * w).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        results[name] = (out.detach(), grads)
    # ZeRO-3 averages gradients over the dp x sp ranks: that average must be the sp=1 gradient
    avg = {}
    for n, gr in results["sp"][1].items():
        gr = gr.clone()
        torch.distributed.all_reduce(gr, group=ps.sp_group)
        avg[n] = gr / ps.sp_size
    if rank == 0:
        torch.save({"ref_out": results["ref"][0], "sp_out": results["sp"][0], "ref_grads": results["ref"][1],
                    "sp_avg_grads": avg, "seq_len": ctx.seq_len, "layouts_ok": layouts_ok}, out_file)
