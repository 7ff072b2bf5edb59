"""Video Sparse Attention (VSA): the public entry point and the choice of backend.

Owns `video_sparse_attention` (raster [B, S, H, D] in, same out), the backend resolver, the
optional FastVideo CUDA kernel glue, and a dense masked reference for tests. The pieces live in
vsa_tiling (cube layout, top-k budget), vsa_torch (coarse stage, selection, chunked fine stage)
and vsa_flex (FlexAttention fine stage).

Algorithm (VSA, arXiv 2505.13389; FastVideo's kernels follow the same steps):
  1. tile tokens into (4, 4, 4) cubes of the (F, H, W) grid, padding each cube to 64 slots;
  2. coarse: dense attention between per-cube means of q, k, v (valid tokens only), broadcast
     back to every token of the query cube;
  3. select per (batch, head, query cube) the top-k key cubes by pre-softmax coarse score;
  4. fine: exact attention of each query cube over the tokens of its selected key cubes;
  5. out = gate * coarse + fine, back in raster order.
With a zero gate and sparsity 0, VSA is exactly dense attention.

Backends: "torch" (pure PyTorch, any device, differentiable), "flex" (compiled FlexAttention;
its CPU backward is vsa_torch's chunked recompute), "triton" (vsa_triton's block-sparse
FlashAttention-2 kernels, forward and backward; CUDA, or CPU under Triton's interpreter; needs the
optional triton package), "fastvideo" (FastVideo's kernels, CUDA only, optional). See
docs/vsa.md for speed and how to choose.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import os

import torch
import torch.nn.functional as F

from megadmd.attention.vsa_flex import flex_block_sparse_attention, flex_supported
from megadmd.attention.vsa_tiling import (
    CUBE_FHW,
    CUBE_TOKENS,
    CubeTiling,
    cube_tiling,
    tile_tokens,
    untile_tokens,
    vsa_topk,
)
from megadmd.attention.vsa_torch import block_sparse_attention, coarse_attention, select_key_cubes

__all__ = [
    "CUBE_FHW",
    "CUBE_TOKENS",
    "CubeTiling",
    "VSA_BACKENDS",
    "cube_tiling",
    "dense_attention_with_block_mask",
    "resolve_vsa_backend",
    "tile_tokens",
    "untile_tokens",
    "video_sparse_attention",
    "vsa_topk",
]

logger = logging.getLogger("megadmd.attention.vsa")

VSA_BACKENDS = ("torch", "flex", "triton", "fastvideo")
# The order "auto" tries on CUDA; torch is the last resort everywhere.
_AUTO_ORDER = ("fastvideo", "triton", "flex")


@functools.lru_cache(maxsize=1)
def _import_fastvideo_vsa():
    """FastVideo's VSA entry point, from `fastvideo_kernel` (current) or `vsa` (legacy).

    Returns (function, None) or (None, reason). Imported lazily: these packages build CUDA
    extensions and must never be touched at import time or on machines without them. Cached,
    so "auto" does not retry a failed import on every attention call.
    """
    errors = []
    for module_name in ("fastvideo_kernel", "vsa"):
        try:
            return importlib.import_module(module_name).video_sparse_attn, None
        except (ImportError, AttributeError) as err:  # reported by the caller, not swallowed
            errors.append(f"{module_name}: {err}")
    return None, "; ".join(errors)


@functools.lru_cache(maxsize=1)
def _import_triton_backend():
    """megadmd.attention.vsa_triton (which imports triton), or None and why not. Imported only
    when the triton backend is asked for or "auto" considers it on CUDA, never on the CPU path."""
    try:
        return importlib.import_module("megadmd.attention.vsa_triton"), None
    except ImportError as err:  # reported by the caller, not swallowed
        return None, f"{err} (pip install 'megadmd[gpu]' or triton)"


def _triton_unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels run on CUDA; on CPU only under Triton's interpreter (TRITON_INTERPRET=1)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels run on cuda, not {device.type}"
    module, reason = _import_triton_backend()
    if module is None:
        return f"triton is not importable: {reason}"
    if device.type == "cpu" and not module.INTERPRETED:
        return "megadmd's Triton kernels were loaded before TRITON_INTERPRET=1 was set"
    return None


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    """None if backend `name` can run on `device`, else a sentence saying why not."""
    if name == "torch":
        return None
    if name == "flex":
        ok, reason = flex_supported(device)
        return None if ok else reason
    if name == "triton":
        return _triton_unavailable_reason(device)
    if device.type != "cuda":
        return f"FastVideo's VSA kernels need a CUDA device, got {device.type}"
    _, reason = _import_fastvideo_vsa()
    if reason is not None:
        return f"FastVideo's VSA kernels are not importable (pip install fastvideo-kernel): {reason}"
    return None


def _auto_skip_reason(name: str, device: torch.device) -> str | None:
    """Why "auto" passes over `name` on `device`: unavailable, or not worth it there."""
    if device.type == "cpu" and name == "triton":
        # Checked before anything imports triton: "auto" on CPU never loads it.
        return "Triton's CPU interpreter is for tests, far slower than the torch backend"
    reason = _unavailable_reason(name, device)
    if reason is None and name == "flex" and device.type == "cpu":
        # docs/vsa.md: on CPU the chunked torch kernel beat compiled flex forward and
        # forward+backward, and flex compiles for 10-20 s per new shape.
        reason = "slower than the torch backend on CPU"
    return reason


@functools.lru_cache(maxsize=None)
def _log_choice_once(message: str) -> None:
    # lru_cache makes this a once-per-message log without a module-level "seen" set.
    logger.info(message)


def resolve_vsa_backend(name: str, device: torch.device | str) -> str:
    """Map "auto" | "torch" | "flex" | "triton" | "fastvideo" to a backend that can run on `device`.

    An explicit name that cannot run raises RuntimeError with the reason. "auto" takes the
    first of fastvideo, triton, flex, torch that can run and is worth it on this device (on CPU
    that is torch: see docs/vsa.md), and logs its choice once per outcome, with why it passed
    over the ones before.
    """
    device = torch.device(device)
    if name != "auto" and name not in VSA_BACKENDS:
        raise ValueError(f"unknown VSA backend {name!r}; choose auto or one of {VSA_BACKENDS}")
    if name != "auto":
        reason = _unavailable_reason(name, device)
        if reason is not None:
            raise RuntimeError(f"VSA backend {name!r} cannot run on {device}: {reason}")
        return name
    skipped = []
    for candidate in _AUTO_ORDER:
        reason = _auto_skip_reason(candidate, device)
        if reason is None:
            break
        skipped.append(f"{candidate}: {reason}")
    else:
        candidate = "torch"
    passed_over = f" (passed over {'; '.join(skipped)})" if skipped else ""
    _log_choice_once(f"VSA backend auto -> {candidate} on {device.type}{passed_over}")
    return candidate


def _check_inputs(q_bshd, k_bshd, v_bshd, gate_bshd, grid_fhw) -> None:
    shape = q_bshd.shape
    if q_bshd.dim() != 4:
        raise ValueError(f"expected q as [B, S, H, D], got shape {tuple(shape)}")
    for name, t in (("k", k_bshd), ("v", v_bshd), ("gate", gate_bshd)):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, q has {tuple(shape)}")
    if math.prod(grid_fhw) != shape[1]:
        raise ValueError(f"grid {tuple(grid_fhw)} holds {math.prod(grid_fhw)} tokens, q has {shape[1]}")


def video_sparse_attention(
    q_bshd: torch.Tensor,
    k_bshd: torch.Tensor,
    v_bshd: torch.Tensor,
    gate_bshd: torch.Tensor,
    grid_fhw: tuple[int, int, int],
    sparsity: float,
    backend: str = "torch",
) -> torch.Tensor:
    """VSA over a video token grid. q, k, v, gate and the result are [B, S, H, D], raster order.

    `grid_fhw` is the post-patchify (F, H, W) grid with S = F * H * W; q and k carry RoPE already.
    `sparsity` is the fraction of key cubes each query cube skips. `backend` is "auto", "torch",
    "flex", "triton" or "fastvideo" (see resolve_vsa_backend). Softmax scale is 1/sqrt(D).
    """
    _check_inputs(q_bshd, k_bshd, v_bshd, gate_bshd, grid_fhw)
    backend = _backend_for(backend, q_bshd)
    tiling = cube_tiling(tuple(grid_fhw), q_bshd.device)
    topk = vsa_topk(sparsity, tiling.num_cubes)
    if backend == "fastvideo":
        return _fastvideo_attention(q_bshd, k_bshd, v_bshd, gate_bshd, tiling, topk)

    q_bhpd, k_bhpd, v_bhpd = (tile_tokens(x, tiling) for x in (q_bshd, k_bshd, v_bshd))
    coarse_bhcd, scores_bhcc = coarse_attention(q_bhpd, k_bhpd, v_bhpd, tiling)
    if topk == tiling.num_cubes:
        # Every key cube selected: the fine stage is dense attention over all tokens, which does
        # not depend on token order, so SDPA on the raster layout computes it with no padding.
        q_bhsd, k_bhsd, v_bhsd = (x.transpose(1, 2) for x in (q_bshd, k_bshd, v_bshd))
        fine_bshd = F.scaled_dot_product_attention(q_bhsd, k_bhsd, v_bhsd).transpose(1, 2)
    else:
        kv_cubes_bhck = select_key_cubes(scores_bhcc, topk)
        fine_bshd = untile_tokens(_fine_stage(backend)(q_bhpd, k_bhpd, v_bhpd, kv_cubes_bhck, tiling), tiling)
    coarse_bshd = coarse_bhcd.index_select(2, tiling.cube_of_token).transpose(1, 2)
    return torch.addcmul(fine_bshd, gate_bshd, coarse_bshd)


def _backend_for(name: str, q_bshd: torch.Tensor) -> str:
    """resolve_vsa_backend, then the one check that needs the tensor: the triton kernels take
    fp16/bf16/fp32 and head_dim <= 256. "auto" then falls back to flex (logged once); an
    explicit "triton" raises."""
    backend = resolve_vsa_backend(name, q_bshd.device)
    if backend != "triton":
        return backend
    reason = _import_triton_backend()[0].unsupported_reason(q_bshd)
    if reason is None:
        return backend
    if name != "auto":
        raise RuntimeError(f"VSA backend 'triton' cannot run these inputs: {reason}")
    fallback = "flex" if _unavailable_reason("flex", q_bshd.device) is None else "torch"
    _log_choice_once(f"VSA backend auto -> {fallback} for these inputs ({reason})")
    return fallback


def _fine_stage(backend: str):
    """The fine-stage function of a resolved backend (all share one signature)."""
    if backend == "triton":
        return _import_triton_backend()[0].triton_block_sparse_attention
    return flex_block_sparse_attention if backend == "flex" else block_sparse_attention


def _fastvideo_attention(q_bshd, k_bshd, v_bshd, gate_bshd, tiling: CubeTiling, topk: int):
    """Whole VSA (coarse, top-k, fine, gate) in FastVideo's kernels, on our cube layout.

    Untested here (no CUDA in CI). The entry point's arguments changed across releases
    (`vsa`: no block sizes; fastvideo-kernel < 0.3: kv sizes; later: kv and q sizes), so the
    call is shaped by its signature. Its kernels expect bf16 and head_dim 64 or 128.
    """
    vsa_fn, reason = _import_fastvideo_vsa()
    if vsa_fn is None:
        raise RuntimeError(f"FastVideo's VSA kernels are not importable: {reason}")
    params = inspect.signature(vsa_fn).parameters
    gate_bhpd = tile_tokens(gate_bshd, tiling)
    kwargs = {"topk": topk, "block_size": CUBE_FHW, "compress_attn_weight": gate_bhpd}
    sizes = tiling.cube_sizes.to(torch.int32)  # what its CUDA kernels index with
    if "variable_block_sizes" in params:
        kwargs["variable_block_sizes"] = sizes
    elif not tiling.all_full:
        raise RuntimeError(f"this FastVideo VSA build needs a grid divisible by 4, got {tiling.grid_fhw}")
    if "q_variable_block_sizes" in params:
        kwargs["q_variable_block_sizes"] = sizes
    out_bhpd = vsa_fn(*(tile_tokens(x, tiling) for x in (q_bshd, k_bshd, v_bshd)), **kwargs)
    return untile_tokens(out_bhpd, tiling)


def dense_attention_with_block_mask(
    q_bhpd: torch.Tensor,
    k_bhpd: torch.Tensor,
    v_bhpd: torch.Tensor,
    kv_cubes_bhck: torch.Tensor,
    tiling: CubeTiling,
) -> torch.Tensor:
    """Reference fine stage (tests only; materializes [B, H, P, P]): softmax attention in padded
    cube layout under the token mask "key slot is real and its cube is selected by the query's
    cube". Differentiable by plain autograd."""
    batch, heads, _, dim = q_bhpd.shape
    selected_bhcc = torch.zeros(
        batch, heads, tiling.num_cubes, tiling.num_cubes, dtype=torch.bool, device=q_bhpd.device
    )
    selected_bhcc.scatter_(-1, kv_cubes_bhck, True)
    allowed = selected_bhcc[..., :, None, :, None] & tiling.slot_valid_ct[None, None, None, None]
    allowed_bhpp = allowed.expand(-1, -1, -1, CUBE_TOKENS, -1, -1).reshape(
        batch, heads, tiling.num_slots, tiling.num_slots
    )
    scores = torch.matmul(q_bhpd, k_bhpd.transpose(-1, -2)) / math.sqrt(dim)
    scores = scores.masked_fill(~allowed_bhpp, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v_bhpd)
