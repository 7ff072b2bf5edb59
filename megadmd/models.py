"""Wan DiT folders: find them, read their config, load them, and call them.

Every role is a diffusers ``WanTransformer3DModel`` loaded with ``from_pretrained`` from a
diffusers-format folder, or from the ``transformer`` subfolder of a diffusers pipeline folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import ConfigError

WAN_CLASS = "WanTransformer3DModel"


def resolve_model_dir(path: str | Path, subfolder: str = "transformer", what: str = "model") -> Path:
    """The folder holding the transformer's config.json: ``path`` itself or ``path/<subfolder>``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{what} folder not found: {p}")
    if (p / "config.json").is_file():
        return p
    if (p / subfolder / "config.json").is_file():
        return p / subfolder
    raise ConfigError(
        f"{what} folder {p} has no config.json (nor {subfolder}/config.json); "
        f"give a diffusers WanTransformer3DModel folder or a Wan pipeline folder"
    )


def read_model_config(path: str | Path, what: str = "model") -> dict:
    """The transformer's config.json as a dict, checked to be a Wan DiT."""
    d = resolve_model_dir(path, what=what)
    try:
        cfg = json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} config {d / 'config.json'} is not valid JSON: {exc}") from exc
    cls = cfg.get("_class_name", WAN_CLASS)
    if cls != WAN_CLASS:
        raise ConfigError(f"{what} at {d} is a {cls}, expected a {WAN_CLASS}")
    return cfg


def load_wan(path: str | Path, dtype: torch.dtype = torch.float32, what: str = "model"):
    """Load a Wan DiT with diffusers' ``from_pretrained`` (the real loading code)."""
    from diffusers import WanTransformer3DModel

    d = resolve_model_dir(path, what=what)
    return WanTransformer3DModel.from_pretrained(str(d), torch_dtype=dtype)


def build_wan(config: dict, seed: int = 0):
    """A freshly initialized Wan DiT from architecture kwargs (for built-in and test models)."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**config)


def model_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def predict_velocity(
    call: Callable,
    x_t: torch.Tensor,
    t: torch.Tensor,
    text: torch.Tensor,
    dtype: torch.dtype,
    image_embeds: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run a Wan DiT (engine or bare module) and return its velocity prediction in float32.

    Inputs are cast to the model's compute dtype; the DMD math stays in float32.
    """
    kwargs = {}
    if image_embeds is not None:
        kwargs["encoder_hidden_states_image"] = image_embeds.to(dtype)
    out = call(
        hidden_states=x_t.to(dtype),
        timestep=t.to(torch.float32),
        encoder_hidden_states=text.to(dtype),
        return_dict=False,
        **kwargs,
    )[0]
    return out.float()


def attach_vsa_gates(module: torch.nn.Module, model_dir: str | Path | None) -> int:
    """Give every block's self-attention a VSA gate projection (``attn1.to_gate_compress``).

    Gates found in the folder's safetensors (if a folder is given) are loaded; missing ones start
    at zero, so a dense
    checkpoint stays exactly itself at sparsity 0. Returns how many gates were loaded.
    """
    from safetensors import safe_open

    from .attention.processor import GATE_ATTR

    dim = module.config.num_attention_heads * module.config.attention_head_dim
    for block in module.blocks:
        gate = torch.nn.Linear(dim, dim, bias=True, dtype=block.attn1.to_q.weight.dtype)
        torch.nn.init.zeros_(gate.weight)
        torch.nn.init.zeros_(gate.bias)
        setattr(block.attn1, GATE_ATTR, gate)
    found = {}
    files = sorted(resolve_model_dir(model_dir).glob("*.safetensors")) if model_dir is not None else []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                if f".{GATE_ATTR}." in key:
                    found[key] = h.get_tensor(key)
    if found:
        missing, unexpected = module.load_state_dict(found, strict=False)
        if unexpected:
            raise ConfigError(f"VSA gate weights in {model_dir} do not fit the model: {unexpected[:3]}")
    return len(found) // 2
