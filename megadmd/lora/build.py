"""Building a LoRA run's roles: the teacher's ``SharedBase`` (the base and one view per LoRA role),
the trainable roles' ``LoRARole`` modules, the generator's VSA gates, and the checks preflight runs.

Called from roles.build_models (the modules), runner.prepare_module (attention, checkpointing, VSA
gates) and preflight (target matching on a meta-device model, before any process starts).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from ..config import TRAINABLE_ROLES, ConfigError, LoRAConfig
from .adapter import LoRARole, SharedBase, expert_items, target_layers

log = logging.getLogger("megadmd")


def build_lora_role(role: str, base_engine, lora: LoRAConfig, seed: int) -> LoRARole:
    """The ``role``'s module: a fresh adapter (B = 0, so it starts as the teacher) over its view in
    ``base_engine``, the teacher's ZeRO-3 inference engine (whose module is a ``SharedBase``).

    The base is already partitioned: the adapters read only the target layers' ``in_features`` and
    ``out_features``. Seeded, so every rank builds the same adapter.
    """
    module = LoRARole(role, base_engine.module, lora, seed=seed + 1 + TRAINABLE_ROLES.index(role))
    module.release_backward_leftovers = base_engine.optimizer.release_backward_leftovers
    n = sum(p.numel() for p in module.parameters())
    log.info("%s: LoRA rank %d (alpha %g) on %d layers of the teacher's weights, %.3fM parameters", role,
             module.rank, module.alpha, len(module.layers()), n / 1e6)
    return module


def prepare_shared_base(shared: SharedBase, pstate, vsa, checkpointing) -> None:
    """runner.prepare_module for the teacher of a LoRA run: each view gets the attention processors
    and sequence-parallel hooks of its role (VSA for the generator only, its gates set later by
    ``add_vsa_gates``) and that role's activation checkpointing (``checkpointing.<role>``)."""
    from ..attention.processor import configure_attention
    from ..models import experts_of

    for role, view in shared.views().items():
        configure_attention(view, sp_group=pstate.sp_group, sp_size=pstate.sp_size, sp_rank=pstate.sp_rank,
                            vsa=vsa if role == "generator" else None)
        if getattr(checkpointing, role):
            for expert in experts_of(view):
                expert.enable_gradient_checkpointing()  # torch.utils.checkpoint per block, non-reentrant


def add_vsa_gates(module: LoRARole, model_dir: Optional[str]) -> int:
    """Give the generator's LoRA role a VSA gate per block (``<block>.attn1.to_gate_compress``, the
    name a full model has) and point its view's VSA processors at them. The gates have no
    counterpart in the teacher, so they are no adapter of a frozen weight: they train fully in the
    adapter engine, as full-weight VSA distillation trains them. Loaded from ``model_dir`` when it
    holds them, else zero. Returns how many were loaded."""
    from ..attention.processor import GATE_ATTR
    from ..models import read_vsa_gates, zero_vsa_gate

    view = module.lora_base
    for prefix, expert in expert_items(view):
        for i, block in enumerate(expert.blocks):
            gate = zero_vsa_gate(view.config, torch.float32)
            module.add_at(f"{prefix}blocks.{i}.attn1.{GATE_ATTR}", gate)
            block.attn1.processor.gate = gate  # a reference: the gate stays the adapter engine's
    found = read_vsa_gates(view, model_dir)
    if found:
        _, unexpected = module.load_state_dict(found, strict=False)
        if unexpected:
            raise ConfigError(f"VSA gate weights in {model_dir} do not fit the model: {unexpected[:3]}")
    log.info("%s: VSA gates %s, trained fully in its adapter engine", module.role,
             f"loaded for {len(found) // 2} blocks" if found else "zero-initialized")
    return len(found) // 2


def check_lora_targets(lora: LoRAConfig, model_config: dict, boundary_ratio: Optional[float]) -> int:
    """Preflight: the targets match Linear layers of the teacher's architecture (built on the meta
    device: no memory, no weights). Returns the number of adapted layers."""
    from diffusers import WanTransformer3DModel

    from ..models import WanExperts

    args = {k: v for k, v in model_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = WanTransformer3DModel(**args)
        if boundary_ratio is not None:
            model = WanExperts(model, WanTransformer3DModel(**args), boundary_ratio)
    return len(target_layers(model, lora))


def checkpoint_lora(ckpt: Path, role: str) -> Optional[dict]:
    """A checkpoint's LoRA settings for ``role`` (its resolved config.json), or None if the role
    trained full weights there."""
    import json

    cfg_file = Path(ckpt) / "config.json"
    if not cfg_file.is_file():
        return None
    lo = json.loads(cfg_file.read_text()).get("model", {}).get("lora", {})
    if not (lo.get("enabled") and role in lo.get("roles", [])):
        return None
    return {**lo, "alpha": float(lo["rank"] if lo.get("alpha") is None else lo["alpha"])}
