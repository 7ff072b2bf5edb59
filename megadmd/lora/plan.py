"""LoRA in ``megadmd plan`` (docs/memory-planner.md): the adapters' parameters and the activations
they add, from the Wan architecture built on the meta device (no memory) and the same target
matching training uses.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

from ..config import LORA_DEFAULT_TARGETS, LoRAConfig


@dataclass(frozen=True)
class AdapterShape:
    """The adapted Linear layers of one Wan DiT, as (name, in_features, out_features)."""

    layers: tuple
    rank: int

    def tensors(self) -> tuple:
        """``(name, numel, count)`` of every adapter tensor, as plan.WanParams lists them."""
        out = []
        for name, fan_in, fan_out in self.layers:
            out += [(f"{name}.lora_A.weight", self.rank * fan_in, 1), (f"{name}.lora_B.weight", fan_out * self.rank, 1)]
        return tuple(out)

    def per_block(self, kind: str) -> int:
        """Adapted layers of the busiest block that read ``kind`` tokens: "video" or "text" (the
        cross-attention's keys and values read the T text tokens)."""
        counts: dict = {}
        for name, _, _ in self.layers:
            if name.startswith("blocks."):
                block = name.split(".")[1]
                text = ".attn2.to_k" in name or ".attn2.to_v" in name
                if (kind == "text") == text:
                    counts[block] = counts.get(block, 0) + 1
        return max(counts.values(), default=0)

    def outside_blocks(self, name_part: str) -> int:
        return sum(1 for name, _, _ in self.layers if not name.startswith("blocks.") and name_part in name)


def adapter_shape(wan_config: dict, rank: int, targets: Optional[list] = None) -> AdapterShape:
    """The layers ``model.lora`` adapts in a Wan DiT of this architecture (one expert)."""
    import json

    config = json.dumps({k: v for k, v in wan_config.items() if not k.startswith("_")}, sort_keys=True)
    return _adapter_shape(config, rank, tuple(targets or LORA_DEFAULT_TARGETS))


@functools.lru_cache(maxsize=16)
def _adapter_shape(config: str, rank: int, targets: tuple) -> AdapterShape:
    """Cached: building a 14B model's modules on the meta device takes seconds."""
    import json

    import torch
    from diffusers import WanTransformer3DModel

    from .adapter import target_layers

    args = json.loads(config)
    with torch.device("meta"):
        model = WanTransformer3DModel(**args)
    lora = LoRAConfig(enabled=True, rank=rank, target_modules=list(targets))
    layers = tuple((n, m.in_features, m.out_features) for n, m in target_layers(model, lora).items())
    return AdapterShape(layers=layers, rank=rank)


def extra_activation_bytes(shape: AdapterShape, a) -> tuple:
    """What a LoRA role's forward keeps for backward relative to a full-weight one, per sample:
    (bytes per block, on the output head, in the text embedder) for plan.train_bytes. Derived
    from plan.block_bytes_per_token, term by term, and checked with saved-tensor hooks
    (tests/unit/test_plan.py):

    - added: ``lora_B`` keeps its rank-r input, r c bytes per token of each adapted layer (the
      cross-attention's keys and values read the T text tokens, proj_out all S tokens, the time
      and text embedders one vector). ``lora_A`` keeps the layer's input, which the full-weight
      layer kept for its own weight gradient; the scale and the sum keep nothing.
    - removed: the modulation is frozen and comes from the timestep, so the multiplies by it keep
      only the small modulation tensors, not the norm1 and norm3 outputs and ff_output.float()
      (3 x 4 D) nor the self-attention output (c D); the frozen RMS norms need no normalized copy
      for a weight gradient (4 bytes each in PyTorch's composite CPU version, nothing on CUDA,
      whose fused kernel keeps input and rstd either way); the head keeps norm_out's input only
      (proj_out is frozen unless adapted); the frozen text embedder keeps nothing but its output,
      which the adapted cross-attention keys and values keep.
    """
    r, c, d = shape.rank, a.c, a.d
    rms = 0 if a.fused_rms_norm else 4
    block = (r * c * (shape.per_block("video") * a.local_tokens + shape.per_block("text") * a.text_len)
             - (12 + c + 3 * rms) * d * a.local_tokens - rms * d * a.text_len)
    head_layers = shape.outside_blocks("proj_out")
    head = -(4 + c) * d * a.tokens + head_layers * (c * d + r * c) * a.tokens
    embedders = shape.outside_blocks("") - head_layers  # one vector per sample each
    keeps_text = shape.per_block("text") > 0
    text = -c * a.text_len * (a.text_dim + (2 if keeps_text else 3) * d) + r * c * embedders
    return block, head, text
