"""VSA at inference inside diffusers' pipelines: ``enable_vsa(pipe.transformer)``.

A VSA-distilled generator was trained with megadmd's self-attention processor running VSA, whose
coarse branch is weighted by a per-block gate (``attn1.to_gate_compress``). diffusers' own Wan
attention knows neither, so sampling it there runs dense attention without the gates: slower,
and not the attention the generator was trained with. ``enable_vsa`` installs the very processor
training used (megadmd/attention/processor.py) with the gates loaded from the model's folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError


def enable_vsa(transformer: torch.nn.Module, sparsity: Optional[float] = None, backend: str = "auto",
               weights: Optional[str | Path] = None) -> int:
    """Sample ``transformer`` (a diffusers ``WanTransformer3DModel``) with VSA, gates included.

    - ``sparsity``: the fraction of key cubes each query cube skips; by default the one the
      generator trained at, from the export's ``megadmd_sampling.json``.
    - ``backend``: "auto" (chosen per call on the tensors' device), "torch", "flex" or "fastvideo".
    - ``weights``: the folder holding the gates (``vsa_gates.safetensors`` or any safetensors with
      ``to_gate_compress`` keys); by default the folder the transformer was loaded from.

    Call it again to change the sparsity. For a Wan2.2 pipeline call it on ``pipe.transformer``
    and ``pipe.transformer_2``. Returns the number of gates loaded (0: the coarse branch is off,
    as for a generator distilled with dense attention).
    """
    from ..models import attach_vsa_gates
    from ..parallel.ulysses import SequenceContext
    from ..pipeline.info import read_sampling_info
    from .processor import VSASettings, configure_attention
    from .vsa import VSA_BACKENDS

    folder = weights if weights is not None else transformer.config.get("_name_or_path")
    if folder is not None and not Path(folder).is_dir():
        raise ConfigError(f"enable_vsa: weights folder not found: {folder}; pass weights=<the transformer folder>")
    if sparsity is None:
        info = read_sampling_info(folder) if folder is not None else None
        if info is None or info["attention"]["vsa_sparsity"] <= 0:
            raise ConfigError(f"enable_vsa: give sparsity=... ({folder} records no VSA training in megadmd_sampling.json)")
        sparsity = float(info["attention"]["vsa_sparsity"])
    if not 0 < sparsity < 1:
        raise ConfigError(f"enable_vsa: sparsity must be in (0, 1), got {sparsity}")
    if backend != "auto" and backend not in VSA_BACKENDS:
        raise ConfigError(f"enable_vsa: backend must be auto or one of {', '.join(VSA_BACKENDS)}, got {backend}")
    previous = getattr(transformer, "megadmd_sequence_context", None)
    if isinstance(previous, SequenceContext):  # enabled before: drop the old hooks
        for handle in previous.handles:
            handle.remove()
    loaded = attach_vsa_gates(transformer, folder)
    configure_attention(transformer, vsa=VSASettings(sparsity=float(sparsity), backend=backend))
    return loaded
