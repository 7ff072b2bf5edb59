"""Wan DiT folders: find them, read their config, load them, and call them.

Every role is a diffusers ``WanTransformer3DModel`` loaded with ``from_pretrained`` from a
diffusers-format folder, or from the ``transformer`` subfolder of a diffusers pipeline folder.
Wan2.2's two-expert models (A14B) hold a high-noise expert (``transformer``) and a low-noise
expert (``transformer_2``); ``WanExperts`` wraps the pair as one module that routes by timestep.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import ConfigError

WAN_CLASS = "WanTransformer3DModel"
# The generator's VSA gates, kept out of diffusers' weight files so that diffusers loads a
# distilled folder with no unused-weights warning (megadmd loads every *.safetensors).
GATES_FILE = "vsa_gates.safetensors"


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


def check_weight_files(path: str | Path, what: str = "model") -> None:
    """Every safetensors file of a model folder opens (a truncated or overwritten one is one line
    naming it, before anything starts, rather than a traceback from inside from_pretrained)."""
    from .io_utils import open_safetensors

    for f in sorted(resolve_model_dir(path, what=what).glob("*.safetensors")):
        with open_safetensors(f, f"{what} weights file"):
            pass


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
    condition: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run a Wan DiT (engine or bare module) and return its velocity prediction in float32.

    Inputs are cast to the model's compute dtype; the DMD math stays in float32. For image-to-video
    models, ``condition`` ([B, 4 + C, F, H, W]: frame mask, then the image latent) is concatenated
    to the noisy latent's channels and ``image_embeds`` (CLIP) goes to the image cross-attention, as
    diffusers' WanImageToVideoPipeline does; the prediction covers the noisy channels only.
    """
    kwargs = {}
    if image_embeds is not None:
        kwargs["encoder_hidden_states_image"] = image_embeds.to(dtype)
    hidden = x_t if condition is None else torch.cat([x_t, condition.to(x_t.dtype)], dim=1)
    out = call(
        hidden_states=hidden.to(dtype),
        timestep=t.to(torch.float32),
        encoder_hidden_states=text.to(dtype),
        return_dict=False,
        **kwargs,
    )[0]
    return out.float()


def is_gate_key(key: str) -> bool:
    from .attention.processor import GATE_ATTR

    return f".{GATE_ATTR}." in key


def attach_vsa_gates(module: torch.nn.Module, model_dir: str | Path | None) -> int:
    """Give every block's self-attention a VSA gate projection (``attn1.to_gate_compress``).

    Gates found in the folder's safetensors (if a folder is given) are loaded; missing ones start
    at zero, so a dense checkpoint stays exactly itself at sparsity 0. Each gate takes the device
    and dtype of its block's ``to_q``. Returns how many gates were loaded.
    """
    from safetensors import safe_open

    from .attention.processor import GATE_ATTR

    dim = module.config.num_attention_heads * module.config.attention_head_dim
    blocks = [b for m in experts_of(module) for b in m.blocks]
    for block in blocks:
        ref = block.attn1.to_q.weight
        gate = torch.nn.Linear(dim, dim, bias=True, dtype=ref.dtype, device=ref.device)
        torch.nn.init.zeros_(gate.weight)
        torch.nn.init.zeros_(gate.bias)
        setattr(block.attn1, GATE_ATTR, gate)
    found = {}
    for prefix, folder in _weight_folders(module, model_dir):
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():
                    if is_gate_key(key):
                        found[prefix + key] = h.get_tensor(key)
    if found:
        missing, unexpected = module.load_state_dict(found, strict=False)
        if unexpected:
            raise ConfigError(f"VSA gate weights in {model_dir} do not fit the model: {unexpected[:3]}")
    return len(found) // 2


def _weight_folders(module, model_dir) -> list:
    if model_dir is None:
        return []
    if isinstance(module, WanExperts):
        high, low = expert_dirs(model_dir)
        return [("high.", high), ("low.", low)]
    return [("", resolve_model_dir(model_dir))]


class WanExperts(torch.nn.Module):
    """Wan2.2's two experts as one module: ``high`` for ``t >= boundary_ratio * 1000``, ``low`` below.

    One module (so one ZeRO-3 engine per role, see docs/moe.md) whose forward routes each sample
    by its timestep. The trainer draws timesteps so that a micro-batch never mixes experts across
    ranks (ZeRO-3 gathers are collective); a mixed batch (e.g. at inference) is split and run
    expert by expert. ``used`` records which experts ran with trainable parameters since the
    last reset, so an update can leave the other expert untouched.
    """

    def __init__(self, high: torch.nn.Module, low: torch.nn.Module, boundary_ratio: float):
        super().__init__()
        self.high = high
        self.low = low
        self.boundary_ratio = float(boundary_ratio)
        self.used: set = set()

    @property
    def config(self):
        return self.high.config

    @property
    def boundary_t(self) -> float:
        return self.boundary_ratio * 1000.0

    def experts(self) -> dict:
        return {"high": self.high, "low": self.low}

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                return_dict: bool = False, **kwargs):
        high = timestep >= self.boundary_t
        out = None
        for name, mask in (("high", high), ("low", ~high)):
            if not bool(mask.any()):
                continue
            expert = getattr(self, name)
            if torch.is_grad_enabled() and any(p.requires_grad for p in expert.parameters()):
                self.used.add(name)
            if bool(mask.all()):
                return (expert(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                               return_dict=False, **kwargs)[0],)
            img = encoder_hidden_states_image[mask] if encoder_hidden_states_image is not None else None
            part = expert(hidden_states[mask], timestep[mask], encoder_hidden_states[mask], img,
                          return_dict=False, **kwargs)[0]
            if out is None:
                out = part.new_zeros(hidden_states.shape[0], *part.shape[1:])
            out = out.index_put((mask.nonzero().squeeze(1),), part)
        return (out,)


def expert_for(module: torch.nn.Module, t: torch.Tensor) -> torch.nn.Module:
    """The bare Wan DiT that handles timesteps ``t`` (all on one side of the boundary)."""
    if not isinstance(module, WanExperts):
        return module
    high = t >= module.boundary_t
    if bool(high.all()):
        return module.high
    if not bool(high.any()):
        return module.low
    raise ValueError("these timesteps span both experts; run them through the WanExperts module")


def experts_of(module: torch.nn.Module) -> list:
    """The Wan DiTs inside a role's module: itself, or the two experts."""
    return list(module.experts().values()) if isinstance(module, WanExperts) else [module]


def expert_dirs(path: str | Path, what: str = "model") -> tuple[Path, Path]:
    """``transformer`` and ``transformer_2`` of a Wan2.2 pipeline folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{what} folder not found: {p}")
    high, low = p / "transformer", p / "transformer_2"
    missing = [d.name for d in (high, low) if not (d / "config.json").is_file()]
    if missing:
        raise ConfigError(f"{what} folder {p} has no {' or '.join(missing)}/config.json; a two-expert "
                          f"(Wan2.2) model needs both transformer and transformer_2, or unset model.boundary_ratio")
    return high, low


def load_role_model(path: str | Path, dtype: torch.dtype, boundary_ratio: Optional[float], what: str = "model"):
    """One Wan DiT, or the two experts of a Wan2.2 pipeline folder when ``boundary_ratio`` is set."""
    if boundary_ratio is None:
        return load_wan(path, dtype=dtype, what=what)
    high, low = expert_dirs(path, what)
    return WanExperts(load_wan(high, dtype=dtype, what=what), load_wan(low, dtype=dtype, what=what), boundary_ratio)
