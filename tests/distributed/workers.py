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


def _with_random_gates(model, seed: int):
    from megadmd.attention.processor import GATE_ATTR

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            gate = getattr(block.attn1, GATE_ATTR)
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.1)
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=g) * 0.1)


def ulysses_forward_backward(rank: int, world: int, latent_shape: list, out_file: str,
                             vsa_sparsity: float = 0.0) -> None:
    """sp=world Wan forward/backward against the single-process model, inside each rank; with
    ``vsa_sparsity > 0`` both models run VSA (random non-zero gates)."""
    from megadmd.attention.processor import VSASettings, configure_attention
    from megadmd.models import attach_vsa_gates
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
    vsa = None
    if vsa_sparsity > 0:
        vsa = VSASettings(sparsity=vsa_sparsity, backend="torch")
        for m in (ref, sp_model):
            attach_vsa_gates(m, None)
            _with_random_gates(m, seed=5)
        configure_attention(ref, vsa=vsa)
    ctx = configure_attention(sp_model, sp_group=ps.sp_group, sp_size=ps.sp_size, sp_rank=ps.sp_rank, vsa=vsa)
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


def load_and_gather(rank: int, world: int, overrides: list, out_file: str) -> None:
    """Build a trainer that resumes (per ``overrides``) and save its full, gathered state."""
    from megadmd.config import resolve
    from megadmd.runner import build_trainer
    from megadmd.zero import full_state_dict

    t = build_trainer(resolve(overrides=overrides))
    got = {r: full_state_dict(t.models.engine(r).module) for r in ("generator", "fake_score")}
    got["ema"] = t.ema.full_state_dict() if t.ema is not None else None
    if rank == 0:
        torch.save({**got, "step": t.state.step}, out_file)


def train_save_and_probe(rank: int, world: int, overrides: list, out_file: str) -> None:
    """Train (per ``overrides``), save a checkpoint, and record each trainable role's module
    output on a fixed input: what the converted folders must reproduce."""
    from megadmd.config import resolve
    from megadmd.runner import build_trainer

    t = build_trainer(resolve(overrides=overrides))
    t.train()
    path = t.checkpointer.save(t)
    g = torch.Generator().manual_seed(3)
    shape = t.data.dataset.info.latent_shape
    x = torch.randn(2, *shape, generator=g)
    text = torch.randn(2, 5, 32, generator=g)
    step = torch.tensor([900.0, 400.0])
    outs = {}
    with torch.no_grad():
        for role in ("generator", "fake_score"):
            outs[role] = t.models.engine(role).module(x, step, text, return_dict=False)[0]
    if rank == 0:
        torch.save({"x": x, "t": step, "text": text, "outputs": outs, "checkpoint": str(path),
                    "steps": [float(s) for s in t.steps]}, out_file)


def guard_agreement(rank: int, world: int, out_file: str) -> None:
    """Updates of a tiny ZeRO-3 engine where only rank 1 sees a non-finite batch: record, per
    rank, whether each update applied and what the guard found (rank 0 saves them)."""
    import torch.distributed as dist

    from megadmd.dmd.guard import NonFiniteError, NonFiniteGuard
    from megadmd.dmd.trainer import TrainState
    from megadmd.parallel.init import init_distributed
    from megadmd.zero import full_state_dict
    from tests.helpers import tiny_zero3_engine

    init_distributed("gloo")
    engine = tiny_zero3_engine()
    state = TrainState()

    def update(guard, bad_rank: int) -> bool:
        guard.begin()
        if rank == bad_rank:
            guard.check("batch", torch.tensor([float("nan")]))
        loss = engine(torch.randn(4, 8) + rank).pow(2).mean()
        engine.backward(guard.gate(loss, engine.is_gradient_accumulation_boundary(), "fake_score", 1))
        engine.step()
        return guard.finish("fake_score", engine, 1, state)

    skip = NonFiniteGuard("skip", 5)
    before = full_state_dict(engine.module)
    out = {"skip": (update(skip, bad_rank=1), skip.found)}
    out["unchanged"] = all(torch.equal(v, full_state_dict(engine.module)[k]) for k, v in before.items())
    out["clean"] = (update(skip, bad_rank=-1), skip.found)
    try:
        update(NonFiniteGuard("stop", 5), bad_rank=1)
        out["stop"] = "no error"
    except NonFiniteError as exc:
        out["stop"] = str(exc)
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        torch.save(gathered, out_file)
