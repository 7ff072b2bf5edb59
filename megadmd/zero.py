"""Small ZeRO-3 helpers: full (gathered) parameters of a partitioned module; clearing a ZeRO-3
optimizer's gradient partitions; the roles that fetch whole blocks (``deepspeed.leaf_blocks``)."""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import torch


def full_state_dict(module: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` as a full CPU tensor, gathered from the ZeRO-3 shards.

    Collective over the parameters' partition group: every rank must call it. Read-only: the
    gather has no ``modifier_rank``, so nothing written inside it would persist.
    """
    import deepspeed

    params = list(module.parameters())
    out: dict[str, torch.Tensor] = {}
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for name, p in module.named_parameters():
            out[name] = p.detach().to("cpu", dtype or p.dtype).clone()
    persistent = set(module.state_dict(keep_vars=True).keys())  # skips non-persistent buffers
    for name, b in module.named_buffers():
        if name in persistent:
            out[name] = b.detach().to("cpu").clone()
    return out


def zero_gradient_partitions(engine, params: Optional[Iterable[torch.nn.Parameter]] = None) -> None:
    """Zero this rank's ZeRO-3 gradient partitions of ``params`` (default: every parameter).

    ZeRO-3 keeps each parameter's reduced gradient partition in a flat buffer that only the next
    gradient of that parameter overwrites (with optimizer offload, also in the fp32 groups'
    ``.grad``). A parameter that gets no gradient in an update -- the idle expert of a two-expert
    model -- would step with its previous gradient: counted in the global norm, hence in the
    clipping of the expert that did run, and in its own Adam moments. After a step DeepSpeed
    skipped, that previous gradient is non-finite and would make every later step skip too (or,
    with offload, whose norm skips it, turn the idle expert's moments and weights into NaN).
    Local: no collective.
    """
    opt = engine.optimizer
    wanted = None if params is None else {id(p) for p in params}
    flat = opt.grad_partitions_flat_buffer  # one partition per parameter, in fp16_groups order
    offset = 0
    for group in opt.fp16_groups:
        for p in group:
            n = p.partition_numel()
            if wanted is None or id(p) in wanted:
                flat.narrow(0, offset, n).zero_()
                position = opt.grad_position.get(opt.get_param_id(p)) if opt.offload_optimizer else None
                if position is not None:
                    i, start, count = position
                    grad = opt.fp32_partitioned_groups_flat[i].grad
                    if grad is not None:
                        grad.narrow(0, start, count).zero_()
            offset += n


def block_classes(module: torch.nn.Module) -> list[str]:
    """Fully qualified class names of the transformer blocks of ``module``: the entries of its
    ``blocks`` lists (each expert's, for a two-expert model), as DeepSpeed's
    ``zero_optimization.leaf_module.classes`` takes them."""
    names = {f"{type(b).__module__}.{type(b).__qualname__}"
             for m in module.modules() if isinstance(getattr(m, "blocks", None), torch.nn.ModuleList)
             for b in m.blocks}
    return sorted(names)


def leaf_block_roles(dmd, lora_roles: Iterable[str] = (), activation_checkpointing=None,
                     two_experts: bool = False) -> dict[str, str]:
    """With ``deepspeed.leaf_blocks``: each role mapped to "" where its blocks become ZeRO-3 leaf
    modules, or to why they stay module by module.

    A leaf block's gradients are reduced once, when its backward hook fires (DeepSpeed 0.19,
    ``create_reduce_and_remove_grad_hooks``), so a block that runs twice with gradient in one
    backward reduces twice and trips DeepSpeed's assertion. Hence the conditions: the generator's
    grad forwards are one engine call (the DMD exit step and a one-step regression share it:
    ``DMDTrainer.generator_forward``), and so are the fake score's denoising and GAN-head forwards
    (``DMDTrainer.fake_score_forward``), except on a two-expert model, where the GAN's timesteps
    may fall on the other expert. The GAN's generator loss runs the frozen fake score inside the
    generator's backward, with its blocks' reducing hooks off (``leaf_reduce_hooks_off``). The
    teacher has no backward. Activation checkpointing re-runs
    each block in the backward. With LoRA the roles share the teacher's blocks, which was not
    measured with leaf blocks.
    """
    if tuple(lora_roles):
        return {r: "LoRA roles share the teacher's blocks (not measured with leaf blocks)"
                for r in ("generator", "fake_score", "teacher")}
    why = {"generator": "", "fake_score": "", "teacher": ""}
    reg = dmd.regression
    if reg.weight and reg.num_steps != 1:
        why["generator"] = "dmd.regression.num_steps is not 1, so the generator runs several times per backward"
    if dmd.gan.enabled and two_experts:
        why["fake_score"] = "with two experts the GAN term runs the fake score twice per backward"
    for role in ("generator", "fake_score"):
        if activation_checkpointing is not None and getattr(activation_checkpointing, role):
            why[role] = why[role] or f"model.activation_checkpointing.{role} re-runs its blocks in the backward"
    return why


def has_leaf_blocks(module: torch.nn.Module) -> bool:
    """Whether DeepSpeed made any submodule of ``module`` a ZeRO-3 leaf (its ``_z3_leaf`` flag)."""
    return any(getattr(m, "_z3_leaf", False) for m in module.modules())


@contextmanager
def leaf_reduce_hooks_off(module: torch.nn.Module) -> Iterator[None]:
    """Forwards of a frozen ``module`` whose backward must not reduce its leaf blocks' gradients.

    DeepSpeed 0.19 reduces a leaf block's gradients from a full backward hook on the block
    (``create_reduce_and_remove_grad_hooks``), which fires whenever a backward passes through the
    block, with its parameters frozen or not: it gives each parameter a zero gradient and queues it
    in the engine's bucket. A backward through the frozen fake score inside the generator's
    backward (the GAN's generator loss) would so queue the fake score's parameters, and its own
    next backward would queue them again (DeepSpeed's assertion in ``__reduce_and_partition_ipg_grads``).
    torch takes a module's full backward hooks when its forward runs, so the forwards inside this
    context run without them; DeepSpeed's parameter fetching for the backward does not use them.
    Module-by-module roles need nothing: their reduce hooks sit on parameters, which frozen ones
    never fire.
    """
    leaves = [m for m in module.modules() if getattr(m, "_z3_leaf", False)]
    saved = [(m, m._backward_hooks) for m in leaves]
    for m in leaves:
        m._backward_hooks = OrderedDict()
    try:
        yield
    finally:
        for m, hooks in saved:
            m._backward_hooks = hooks
