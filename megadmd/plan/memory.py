"""Per-rank memory of a DMD2 run on paper, before a queue slot is spent (`megadmd plan`).

Owns the arithmetic only: parameter counts from a Wan architecture (closed form, per tensor),
the bytes each role keeps under ZeRO-3, the transient buffers of ZeRO-3, activation memory of
the Wan blocks, and a fits / does-not-fit verdict. No models are built and no process groups
exist; the only I/O is reading the DeepSpeed templates in ``ds_configs/`` for bucket sizes.
docs/memory-planner.md derives every term; the figures were checked against saved-tensor and
allocation measurements on CPU (tests/unit/test_plan.py).

Symbols used below (per rank): P parameters of a role, W = nodes * gpus_per_node ranks (ZeRO-3
partitions every role over all of them), sp the Ulysses degree, S tokens of one sample after the
(1, 2, 2) patchify, s = ceil(S / sp) tokens a rank holds, b the micro batch, D the hidden size,
F the FFN size, L blocks, T text tokens, c the bytes of the compute dtype (2 for bf16, 4 for fp32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

from ..config import TRAINABLE_ROLES, ConfigError

GIB = 1024 ** 3
OFFLOAD_CHOICES = ("none", "optimizer", "all")
PRECISIONS = {"bf16": 2, "fp32": 4}
DEVICES = ("cuda", "cpu")

# Runtime overhead on a GPU: the CUDA context (0.6 GiB measured on an H100 with PyTorch 2.11)
# plus NCCL communicators and their buffers for the world, dp and sp groups (assumed ~0.9 GiB),
# and caching-allocator fragmentation, assumed 10% of the transient (per-phase) memory, which is
# what gets allocated and freed every iteration.
FIXED_OVERHEAD_GIB = 1.5
FRAGMENTATION = 0.10
ADAM_STATE_BYTES = 8  # exp_avg and exp_avg_sq in fp32
MASTER_BYTES = 4  # the fp32 master partition (DeepSpeed keeps a separate copy even in fp32 runs)
OPT_STEP_TEMP_BYTES = 8  # optimizer step: fp32 copy of the gradient partition + AdamW's sqrt(v) temp


# ---------------------------------------------------------------------------------------------
# Parameters, in closed form from the diffusers WanTransformer3DModel constructor.


@dataclass(frozen=True)
class WanParams:
    """Every parameter tensor of a Wan DiT as (name, numel, count); block tensors have count L."""

    tensors: tuple

    @property
    def total(self) -> int:
        return sum(n * k for _, n, k in self.tensors)

    @property
    def largest_tensor(self) -> int:
        return max(n for _, n, _ in self.tensors)

    def persistent(self, threshold: int) -> int:
        """Parameters ZeRO-3 keeps gathered on every rank (``ds_numel <= threshold``)."""
        return sum(n * k for _, n, k in self.tensors if n <= threshold)

    def partition(self, world: int) -> int:
        """Elements of this rank's ZeRO-3 partition: each tensor is padded to a multiple of W."""
        return sum(-(-n // world) * k for _, n, k in self.tensors)


def wan_params(wan_config: dict, vsa_gates: bool = False) -> WanParams:
    """Closed-form parameter list of a Wan DiT (no image embedder, no added K/V projections)."""
    for key in ("added_kv_proj_dim", "image_dim"):
        if wan_config.get(key):
            raise ConfigError(f"the memory planner models text-to-video Wan DiTs; {key} is not supported")
    d = wan_config["num_attention_heads"] * wan_config["attention_head_dim"]
    ffn = wan_config["ffn_dim"]
    patch = math.prod(wan_config.get("patch_size", (1, 2, 2)))
    c_in, c_out = wan_config["in_channels"], wan_config.get("out_channels") or wan_config["in_channels"]
    L = wan_config["num_layers"]
    t = [
        ("patch_embedding.weight", c_in * patch * d, 1), ("patch_embedding.bias", d, 1),
        ("time_embedder.linear_1.weight", wan_config["freq_dim"] * d, 1), ("time_embedder.linear_1.bias", d, 1),
        ("time_embedder.linear_2.weight", d * d, 1), ("time_embedder.linear_2.bias", d, 1),
        ("time_proj.weight", 6 * d * d, 1), ("time_proj.bias", 6 * d, 1),
        ("text_embedder.linear_1.weight", wan_config["text_dim"] * d, 1), ("text_embedder.linear_1.bias", d, 1),
        ("text_embedder.linear_2.weight", d * d, 1), ("text_embedder.linear_2.bias", d, 1),
        ("proj_out.weight", d * c_out * patch, 1), ("proj_out.bias", c_out * patch, 1),
        ("scale_shift_table", 2 * d, 1),
    ]
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            t += [(f"blocks.{attn}.{proj}.weight", d * d, L), (f"blocks.{attn}.{proj}.bias", d, L)]
        t += [(f"blocks.{attn}.norm_q.weight", d, L), (f"blocks.{attn}.norm_k.weight", d, L)]
    if wan_config.get("cross_attn_norm", True):
        t += [("blocks.norm2.weight", d, L), ("blocks.norm2.bias", d, L)]
    t += [("blocks.ffn.proj.weight", d * ffn, L), ("blocks.ffn.proj.bias", ffn, L),
          ("blocks.ffn.out.weight", ffn * d, L), ("blocks.ffn.out.bias", d, L),
          ("blocks.scale_shift_table", 6 * d, L)]
    if vsa_gates:  # attn1.to_gate_compress, added to the generator when VSA is on (models.py)
        t += [("blocks.attn1.to_gate_compress.weight", d * d, L), ("blocks.attn1.to_gate_compress.bias", d, L)]
    return WanParams(tensors=tuple(t))


# ---------------------------------------------------------------------------------------------
# ZeRO-3 settings that size its buffers, read from the DeepSpeed templates.

_DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ZeroSettings:
    reduce_bucket_size: int = 50_000_000
    prefetch_bucket_size: int = 50_000_000
    persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    sub_group_size: int = 1_000_000_000  # the optimizer steps one sub-group of the partition at a time
    communication_bytes: Optional[int] = 4  # None: the parameter dtype
    grad_accum_bytes: Optional[int] = None  # None: the parameter dtype (DeepSpeed's default)

    @classmethod
    def from_template(cls, template: dict) -> "ZeroSettings":
        z = template.get("zero_optimization", {})
        d = cls()

        def count(key, default):
            value = z.get(key, default)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"the memory planner needs a number for zero_optimization.{key}, got {value!r}")
            return int(value)

        def dtype_bytes(key, name):
            if name is not None and str(name).lower() not in _DTYPE_BYTES:
                raise ConfigError(f"{key}: unknown dtype {name!r}; use one of fp32, fp16, bf16")
            return None if name is None else _DTYPE_BYTES[str(name).lower()]

        return cls(
            reduce_bucket_size=count("reduce_bucket_size", d.reduce_bucket_size),
            prefetch_bucket_size=count("stage3_prefetch_bucket_size", d.prefetch_bucket_size),
            persistence_threshold=count("stage3_param_persistence_threshold", d.persistence_threshold),
            max_live_parameters=count("stage3_max_live_parameters", d.max_live_parameters),
            max_reuse_distance=count("stage3_max_reuse_distance", d.max_reuse_distance),
            sub_group_size=count("sub_group_size", d.sub_group_size),
            communication_bytes=dtype_bytes("communication_data_type", template.get("communication_data_type")),
            grad_accum_bytes=dtype_bytes("data_types.grad_accum_dtype",
                                         template.get("data_types", {}).get("grad_accum_dtype")),
        )


def default_zero_settings(ds=None) -> dict:
    """ZeroSettings per role from a run's templates (``ds``: its config.DeepSpeedConfig; None: the
    defaults)."""
    from ..config import DeepSpeedConfig
    from ..roles import load_ds_template

    ds = ds or DeepSpeedConfig()
    return {role: ZeroSettings.from_template(load_ds_template(getattr(ds, role), f"deepspeed.{role}"))
            for role in ("generator", "fake_score", "teacher")}


def template_offload(ds) -> str:
    """The offload a run's trainable-role templates ask for: none | optimizer | all (parameters
    too), as ``plan_memory``'s ``offload`` takes it; the generator's template decides."""
    from ..roles import load_ds_template

    z = load_ds_template(ds.generator, "deepspeed.generator").get("zero_optimization", {})
    if z.get("offload_param", {}).get("device", "none") == "cpu":
        return "all"
    return "optimizer" if z.get("offload_optimizer", {}).get("device", "none") == "cpu" else "none"


# ---------------------------------------------------------------------------------------------
# Activations of the Wan blocks, in bytes per sample on one rank.


@dataclass(frozen=True)
class ActivationShape:
    d: int  # hidden size D
    ffn: int  # F
    heads: int  # H
    layers: int  # L
    text_dim: int
    tokens: int  # S of one sample
    local_tokens: int  # s = ceil(S / sp)
    sp: int
    text_len: int  # T
    grid: tuple  # post-patchify (f, h, w)
    c: int  # compute dtype bytes
    fused_rms_norm: bool  # CUDA: saves input + rstd; CPU composite: fp32 input and normalized copies

    @property
    def num_cubes(self) -> int:
        return math.prod(-(-n // 4) for n in self.grid)


def block_bytes_per_token(a: ActivationShape) -> float:
    """Bytes one Wan block saves for backward per local token (dense attention).

    fp32 (4 bytes/element): inputs of norm1, norm2, norm3 (3); norm1 and norm3 outputs kept by the
    modulation multiply (2); ff_output.float() kept by the gate multiply (1) -> 24 D.
    compute dtype (c): q, k, v stacked for the all-to-all (3, SDPA keeps v as a view of them);
    RoPE'd q and k (2); cross-attention q (1); inputs of to_q/k/v, both to_out (shared with the
    attention outputs, which flash kernels write in [b, s, h, d]), cross to_q, ffn.proj (5); the
    self-attention output kept by the gate multiply (1) -> 12c D.
    q/k RMS norms (self q, k and cross q): their input (c each) when fused, or an fp32 copy and
    the fp32 normalized tensor (8 each) in PyTorch's composite CPU version.
    FFN: GELU input and output, 2c F. Per-token scalars: 3 LayerNorms (mean, rstd), 3 RMS rstd,
    and the log-sum-exp of both attentions (4 bytes per head each).
    """
    rms = 3 * a.c if a.fused_rms_norm else 3 * 8
    return a.d * (24 + 12 * a.c + rms) + 2 * a.c * a.ffn + (3 * 8 + 3 * 4 + 8 * a.heads)


def text_bytes_per_block(a: ActivationShape) -> float:
    """Cross-attention K/V of the T text tokens in one block: k_lin kept by norm_k, k and v by SDPA."""
    rms = a.c if a.fused_rms_norm else 8
    return a.text_len * a.d * (rms + 2 * a.c)


def text_shared_bytes(a: ActivationShape) -> float:
    """The text embedder's saved tensors, shared by all blocks: its two inputs, GELU input, output."""
    return a.c * a.text_len * (a.text_dim + 3 * a.d)


def head_bytes_per_token(a: ActivationShape) -> float:
    """Output norm and projection, on all S tokens (Ulysses gathers before norm_out): the fp32
    norm input and modulated output, and proj_out's input."""
    return a.d * (8 + a.c)


def vsa_extra_bytes(a: ActivationShape, sparsity: float) -> float:
    """What VSA adds to one generator block per sample, relative to dense attention.

    Modelled on FastVideo's kernels: the gate joins q, k, v in the all-to-all (+c D per token);
    q, k, v and gate are tiled into 64-token cubes (4 padded copies) and the fine stage keeps its
    tiled output and log-sum-exp (5 padded tensors); the coarse cube-mean output broadcast to
    tokens is kept by the gate multiply; the coarse scores and their softmax are
    [b, H/sp, C, C]; the selected key cubes are [b, H/sp, C, K] int64. The RoPE'd q and k that
    SDPA would keep are not kept. Only the last term depends on the sparsity (K shrinks with it),
    and it is at most a few percent of the block.
    """
    from ..attention.vsa_tiling import vsa_topk

    cubes = a.num_cubes
    pad_ratio = cubes * 64 / a.tokens
    local_heads = a.heads // a.sp
    per_token = a.d * a.c * (1 + 5 * pad_ratio + 1 - 2)
    lse = 4 * local_heads * (cubes * 64 - a.tokens)
    coarse = 2 * a.c * local_heads * cubes * cubes
    selection = 8 * local_heads * cubes * vsa_topk(sparsity, cubes)
    return per_token * a.local_tokens + lse + coarse + selection


def train_bytes(a: ActivationShape, checkpointing: bool, vsa_sparsity: Optional[float]) -> tuple:
    """(peak during forward + backward, memory held at the end of the forward), per sample.

    Without checkpointing every block's saved tensors live until its backward; the backward frees
    them about as fast as it makes gradients (measured), so the peak is the end of the forward.
    With checkpointing only each block's input (c D per token) is kept; in backward one block is
    recomputed at a time, next to the gradient of its output.
    """
    blk = block_bytes_per_token(a) * a.local_tokens + text_bytes_per_block(a)
    if vsa_sparsity is not None:
        blk += vsa_extra_bytes(a, vsa_sparsity)
    head = head_bytes_per_token(a) * a.tokens
    shared = text_shared_bytes(a)
    if not checkpointing:
        held = a.layers * blk + head + shared
        return held, held
    inputs = a.layers * a.c * a.d * a.local_tokens + shared
    return inputs + max(head, blk + a.c * a.d * a.local_tokens), inputs + head


def nograd_bytes(a: ActivationShape) -> float:
    """Peak working set of a forward under no_grad, per sample: nothing is kept between blocks,
    so it is the widest point of one block or of the output head on all S tokens, plus the text.

    FFN (measured on an H100 to 1.3%): the block's input (still referenced by the model's loop),
    the residual, the cross-attention output (still referenced in the block), the normalized
    input, GELU input and output: 4c D + 2c F. Self-attention: input, normalized input, stacked
    q/k/v, RoPE'd q/k with RoPE's fp32 temporaries, output: about 10c D (more on CPU, whose
    composite RMSNorm makes fp32 temporaries). Head: its input and two fp32 temporaries, c + 8.
    """
    ffn = 4 * a.c * a.d + 2 * a.c * a.ffn
    attn = 10 * a.c * a.d if a.fused_rms_norm else max(10 * a.c * a.d, (3 * a.c + 16) * a.d)
    return max(max(ffn, attn) * a.local_tokens, (a.c + 8) * a.d * a.tokens) + a.c * a.text_len * a.d


# ---------------------------------------------------------------------------------------------
# The plan.


@dataclass(frozen=True)
class MemoryItem:
    name: str
    role: str  # generator | fake_score | teacher | "" (shared)
    where: str  # GPU | CPU
    gib: float
    how: str  # the formula, for the table


@dataclass
class MemoryPlan:
    model: str
    params: dict  # role -> parameter count
    latent_shape: tuple
    tokens: int
    nodes: int
    gpus_per_node: int
    sp: int
    micro_batch: int
    offload: str
    precision: str
    checkpointing: dict  # trainable role -> bool
    vsa_sparsity: float
    ema: bool
    items: list  # resident items, then the peak phase's transient items, then the overhead
    phases: dict  # phase name -> transient GiB on the GPU (before fragmentation)
    peak_phase: str
    activations_other_gib: float  # the peak phase's activations with checkpointing toggled
    gpu_total_gib: float
    cpu_total_gib: float
    gpu_memory_gib: float
    video_size: Optional[tuple] = None
    fits: bool = False
    reason: str = ""
    wan_config: Optional[dict] = None  # the architecture planned
    text_len: int = 512

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world_size // self.sp

    def gib(self, name: str, role: str = "", where: Optional[str] = None) -> float:
        """Sum of the items called ``name`` (for ``role``, and on ``where`` when given)."""
        return sum(i.gib for i in self.items
                   if i.name == name and i.role == role and (where is None or i.where == where))

    def total_without_overhead_gib(self) -> float:
        return self.gpu_total_gib - self.gib("runtime overhead")


def _resolve_model(model: Union[str, dict], video_size, latent_shape, text_len, vae_scale):
    """(name, wan_config, video_size, latent_shape, text_len) from a preset name or a config dict."""
    from ..presets import get_preset

    if isinstance(model, str):
        preset = get_preset(model)
        name, wan_config, vae_scale = preset.name, preset.wan_config, preset.vae_scale
        if text_len is None:
            text_len = preset.config.get("data", {}).get("text_len") or None
        if video_size is None and latent_shape is None:
            video_size = preset.video_size
        if preset.builtin:
            from ..toy.distribution import ToySpec  # the built-in toy dataset's latents and text

            text_len = text_len or ToySpec().text_len
            if video_size is None and latent_shape is None:
                latent_shape = ToySpec().latent_shape
        if wan_config is None:
            raise ConfigError(f"preset '{model}' has no architecture for the planner")
    else:
        name, wan_config = "custom Wan", model
    if video_size is None and latent_shape is None:
        raise ConfigError(f"give a video size (FRAMES,HEIGHT,WIDTH) for '{name}': it has no default")
    if latent_shape is None:
        latent_shape = _latent_of_video(tuple(video_size), wan_config, vae_scale)
    return name, wan_config, video_size, tuple(latent_shape), text_len or 512


def _latent_of_video(video_size: tuple, wan_config: dict, vae_scale: tuple) -> tuple:
    if len(video_size) != 3 or min(video_size) < 1:
        raise ConfigError(f"video size must be three positive integers FRAMES,HEIGHT,WIDTH, got {video_size}")
    frames, height, width = video_size
    t, s = vae_scale
    _, ph, pw = wan_config.get("patch_size", (1, 2, 2))
    if (frames - 1) % t or height % (s * ph) or width % (s * pw):
        raise ConfigError(f"video size {frames}x{height}x{width}: frames must be {t}k+1 and height and "
                          f"width multiples of {s * ph} (VAE {s}x, patch {ph}x)")
    return (wan_config["in_channels"], (frames - 1) // t + 1, height // s, width // s)


def _checkpointing(value) -> dict:
    if isinstance(value, bool):
        return {r: value for r in TRAINABLE_ROLES}
    unknown = set(value) - set(TRAINABLE_ROLES) - {"teacher"}
    if unknown:
        raise ConfigError(f"activation checkpointing roles must be among generator, fake_score, teacher; "
                          f"got {', '.join(sorted(unknown))}")
    # The teacher only runs under no_grad, where checkpointing changes nothing.
    return {r: bool(value.get(r, True)) for r in TRAINABLE_ROLES}


def _check_numbers(nodes, gpus_per_node, micro_batch, offload, precision, device, vsa_sparsity,
                   gpu_memory_gib):
    for key, v in (("nodes", nodes), ("gpus per node", gpus_per_node), ("micro batch", micro_batch)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key} must be a positive integer, got {v!r}")
    if offload not in OFFLOAD_CHOICES:
        raise ConfigError(f"offload must be one of {', '.join(OFFLOAD_CHOICES)}; got '{offload}'")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got '{precision}'")
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got '{device}'")
    if not 0 <= vsa_sparsity < 1:
        raise ConfigError(f"VSA sparsity must be in [0, 1), got {vsa_sparsity}")
    if not gpu_memory_gib > 0:
        raise ConfigError(f"GPU memory must be positive, got {gpu_memory_gib} GiB")


def _activation_shape(wan_config: dict, latent_shape: tuple, sp: int, text_len: int, c: int,
                      device: str) -> ActivationShape:
    pt, ph, pw = wan_config.get("patch_size", (1, 2, 2))
    _, f, h, w = latent_shape
    grid = (f // pt, h // ph, w // pw)
    tokens = math.prod(grid)
    heads = wan_config["num_attention_heads"]
    return ActivationShape(
        d=heads * wan_config["attention_head_dim"], ffn=wan_config["ffn_dim"], heads=heads,
        layers=wan_config["num_layers"], text_dim=wan_config["text_dim"], tokens=tokens,
        local_tokens=-(-tokens // sp), sp=sp, text_len=text_len, grid=grid, c=c,
        fused_rms_norm=device == "cuda")


def _resident_items(roles: dict, world: int, zero: dict, p_b: int, offload: str, ema: bool) -> list:
    """What each rank holds for the whole run: shards, optimizer states, EMA, ZeRO's fixed buffers."""
    dtype = "bf16" if p_b == 2 else "fp32"
    param_where = "CPU" if offload == "all" else "GPU"
    opt_where = "CPU" if offload != "none" else "GPU"
    items = []
    for role, wp in roles.items():
        z = zero[role]
        n = wp.partition(world)
        items.append(MemoryItem("parameters", role, param_where, p_b * n / GIB,
                                f"{dtype} shard, {p_b} B x P/W"))
        if role in TRAINABLE_ROLES:
            g_b = z.grad_accum_bytes or p_b
            items.append(MemoryItem("gradients", role, opt_where, g_b * n / GIB,
                                    f"{'fp32' if g_b == 4 else 'bf16'} shard, {g_b} B x P/W"))
            opt_b = MASTER_BYTES + ADAM_STATE_BYTES + (4 if offload != "none" else 0)
            how = "fp32 master + Adam m, v" + (" + fp32 grad copy" if offload != "none" else "")
            items.append(MemoryItem("optimizer states", role, opt_where, opt_b * n / GIB,
                                    f"{how}, {opt_b} B x P/W"))
        # With one rank a "gathered" parameter is its partition: DeepSpeed skips the all-gather.
        persistent = wp.persistent(z.persistence_threshold) if world > 1 else 0
        items.append(MemoryItem("ZeRO persistent params", role, "GPU", p_b * persistent / GIB,
                                f"{persistent:,} small params kept whole, {p_b} B each"))
        if role in TRAINABLE_ROLES:
            comm_b = z.communication_bytes or p_b
            items.append(MemoryItem("ZeRO reduce bucket", role, "GPU", z.reduce_bucket_size * comm_b / GIB,
                                    f"{z.reduce_bucket_size:.0e} elements x {comm_b} B"))
    if ema:
        n = roles["generator"].partition(world)
        items.append(MemoryItem("EMA", "generator", opt_where, 4 * n / GIB, "fp32 shard, 4 B x P/W"))
    return items


def _live_elements(wp: WanParams, z: ZeroSettings, training: bool, checkpointing: bool) -> int:
    """Gathered (unpartitioned) parameters of one role while it computes.

    DeepSpeed gathers each module's parameters when the module runs and prefetches up to
    ``stage3_prefetch_bucket_size`` more (within ``stage3_max_live_parameters``). With a complete
    trace it also keeps a released parameter gathered when it is used again within
    ``stage3_max_reuse_distance`` elements: at the forward/backward turnaround that keeps the last
    R / 2 parameters of the forward (R / 3 with checkpointing, whose recompute adds a pass). This
    is the worst case; when our alternating forwards invalidate the trace, less stays gathered.
    """
    np_total = wp.total - wp.persistent(z.persistence_threshold)
    window = wp.largest_tensor + min(z.prefetch_bucket_size, z.max_live_parameters)
    if training:
        window += z.max_reuse_distance // (3 if checkpointing else 2)
    return min(np_total, window)


def _activation_phases(a: ActivationShape, b: int, checkpointing: dict, vsa: Optional[float]) -> dict:
    """Activation bytes per rank in the two update phases (see docs/memory-planner.md).

    Generator update: its forward with grad, then (its activations still held) the fake score's
    no-grad forward at batch b and the teacher's CFG forward at batch 2b, then its backward.
    Fake-score update: the generator's no-grad forward, then the fake score's forward + backward.
    """
    g_peak, g_end = train_bytes(a, checkpointing["generator"], vsa)
    f_peak, _ = train_bytes(a, checkpointing["fake_score"], None)
    nograd = nograd_bytes(a)  # the same for all three roles (VSA's extras under no_grad are small)
    return {
        "generator update": b * max(g_end + 2 * nograd, g_peak),
        "fake_score update": b * max(nograd, f_peak),
    }


def _phase_items(roles: dict, a: ActivationShape, zero: dict, p_b: int, b: int, checkpointing: dict,
                 vsa: Optional[float], offload: str, world: int, latent_numel: int) -> tuple:
    """Transient items of each phase of an iteration, and each update phase's activations (GiB)
    with activation checkpointing toggled."""
    acts = _activation_phases(a, b, checkpointing, vsa)
    other = _activation_phases(a, b, {r: not v for r, v in checkpointing.items()}, vsa)
    # Latents and text of the DMD math in fp32: x0, noise, x_t, both x0 predictions, the DMD
    # direction, velocities, the 2b CFG batch (~12 latents), and positive/negative/CFG text.
    dmd = b * (12 * 4 * latent_numel + 3 * 4 * a.text_len * a.text_dim)

    def live(role, training):
        if world == 1:  # nothing is gathered: parameters are used in place
            return 0
        return _live_elements(roles[role], zero[role], training, checkpointing.get(role, False))

    def reduce_items(role):
        z = zero[role]
        comm_b, acc_b = z.communication_bytes or p_b, z.grad_accum_bytes or p_b
        copy = z.reduce_bucket_size * acc_b if comm_b != acc_b else 0
        size = copy + roles[role].largest_tensor * p_b  # + one full-size gradient before bucketing
        return MemoryItem("ZeRO reduce transients", role, "GPU", size / GIB,
                          "bucket cast to the gradient dtype + one full gradient")

    def act_item(phase, role):
        alt = "without" if checkpointing[role] else "with"
        return MemoryItem("activations", role, "GPU", acts[phase] / GIB,
                          f"{alt} act. checkpointing: {other[phase] / GIB:.2f} GiB")

    def dmd_item():
        return MemoryItem("DMD tensors", "", "GPU", dmd / GIB, "~12 fp32 latents + text, per sample")

    gen_live = live("generator", True) + max(live("fake_score", False), live("teacher", False))
    fake_live = max(live("generator", False), live("fake_score", True))
    phases = {
        "generator update": [
            act_item("generator update", "generator"),
            MemoryItem("ZeRO gathered params", "", "GPU", p_b * gen_live / GIB,
                       "generator (fwd->bwd reuse) + teacher/fake_score window"),
            reduce_items("generator"), dmd_item()],
        "fake_score update": [
            act_item("fake_score update", "fake_score"),
            MemoryItem("ZeRO gathered params", "", "GPU", p_b * fake_live / GIB,
                       "fake_score (fwd->bwd reuse) or generator window"),
            reduce_items("fake_score"), dmd_item()],
    }
    for role in TRAINABLE_ROLES:
        where = "GPU" if offload == "none" else "CPU"
        elements = min(roles[role].partition(world), zero[role].sub_group_size)
        phases[f"{role} optimizer step"] = [MemoryItem(
            "optimizer step temporaries", role, where, OPT_STEP_TEMP_BYTES * elements / GIB,
            "fp32 gradient copy + Adam temp, 8 B x min(P/W, sub-group)")]
    return phases, {p: v / GIB for p, v in other.items()}


def plan_memory(model: Union[str, dict] = "wan2.1-t2v-1.3b", *, video_size: Optional[tuple] = None,
                latent_shape: Optional[tuple] = None, nodes: int = 1, gpus_per_node: int = 8, sp: int = 1,
                offload: str = "none", micro_batch: int = 1, activation_checkpointing=True,
                vsa_sparsity: float = 0.0, ema: bool = False, gpu_memory_gib: float = 80.0,
                precision: str = "bf16", text_len: Optional[int] = None, vae_scale: tuple = (4, 8),
                zero: Optional[dict] = None, device: str = "cuda") -> MemoryPlan:
    """Per-rank memory of a megadmd DMD2 run: ``model`` is a preset name or a Wan config dict.

    ``activation_checkpointing`` is a bool or ``{role: bool}``; ``vsa_sparsity`` > 0 turns VSA on
    for the generator; ``zero`` maps roles to ZeroSettings (default: the ds_configs templates);
    ``device`` "cpu" models PyTorch's CPU kernels (composite RMSNorm), for comparisons on CPU.
    """
    from ..parallel.state import check_layout

    _check_numbers(nodes, gpus_per_node, micro_batch, offload, precision, device, vsa_sparsity, gpu_memory_gib)
    name, wan_config, video_size, latent_shape, text_len = _resolve_model(
        model, video_size, latent_shape, text_len, vae_scale)
    world = nodes * gpus_per_node
    check_layout(world, sp, wan_config["num_attention_heads"])
    checkpointing = _checkpointing(activation_checkpointing)
    zero = zero or default_zero_settings()
    vsa = vsa_sparsity if vsa_sparsity > 0 else None
    p_b = PRECISIONS[precision]
    roles = {"generator": wan_params(wan_config, vsa_gates=vsa is not None),
             "fake_score": wan_params(wan_config), "teacher": wan_params(wan_config)}
    shape = _activation_shape(wan_config, latent_shape, sp, text_len, p_b, device)
    resident = _resident_items(roles, world, zero, p_b, offload, ema)
    phases, other_acts = _phase_items(roles, shape, zero, p_b, micro_batch, checkpointing, vsa, offload,
                                      world, math.prod(latent_shape))
    gpu_phase = {p: sum(i.gib for i in items if i.where == "GPU") for p, items in phases.items()}
    peak = max(gpu_phase, key=gpu_phase.get)
    overhead = FIXED_OVERHEAD_GIB + FRAGMENTATION * gpu_phase[peak]
    items = resident + phases[peak] + [MemoryItem(
        "runtime overhead", "", "GPU", overhead,
        f"CUDA context + NCCL {FIXED_OVERHEAD_GIB} GiB + {FRAGMENTATION:.0%} of transients")]
    gpu_total = sum(i.gib for i in items if i.where == "GPU")
    cpu_step = max(sum(i.gib for i in its if i.where == "CPU") for its in phases.values())
    cpu_total = sum(i.gib for i in resident if i.where == "CPU") + cpu_step
    plan = MemoryPlan(
        model=name, params={r: wp.total for r, wp in roles.items()}, video_size=video_size,
        latent_shape=latent_shape, tokens=shape.tokens, nodes=nodes, gpus_per_node=gpus_per_node, sp=sp,
        micro_batch=micro_batch, offload=offload, precision=precision, checkpointing=checkpointing,
        vsa_sparsity=vsa_sparsity, ema=ema, items=items, phases=gpu_phase, peak_phase=peak,
        activations_other_gib=other_acts.get(peak, 0.0), gpu_total_gib=gpu_total, cpu_total_gib=cpu_total,
        gpu_memory_gib=gpu_memory_gib, wan_config=wan_config, text_len=text_len)
    plan.fits = gpu_total <= gpu_memory_gib
    plan.reason = _reason(plan)
    return plan


def _reason(plan: MemoryPlan) -> str:
    largest = max((i for i in plan.items if i.where == "GPU"), key=lambda i: i.gib)
    what = f"{largest.name}{' (' + largest.role + ')' if largest.role else ''} {largest.gib:.1f} GiB"
    need = f"needs {plan.gpu_total_gib:.1f} of {plan.gpu_memory_gib:g} GiB per GPU at the {plan.peak_phase}"
    if plan.fits:
        return f"fits: {need}; largest item {what}"
    hints = []
    if largest.name == "activations":
        if not all(plan.checkpointing.values()):
            hints.append("turn on activation checkpointing")
        hints.append("raise sp or lower the micro batch")
    else:
        hints.append("use more GPUs" + (" or offload" if plan.offload != "all" else ""))
    return f"does not fit: {need}; largest item {what}; {' or '.join(hints)}"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as an aligned table: header, one row per item, totals, the verdict."""
    def sci(n):
        return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"

    pr = plan.params
    same = pr["generator"] == pr["teacher"]
    params = (f"{sci(pr['teacher'])} parameters per role" if same else
              f"{sci(pr['teacher'])} parameters (generator {sci(pr['generator'])} with VSA gates)")
    video = f"video {'x'.join(map(str, plan.video_size))} -> " if plan.video_size else ""
    local = f" ({-(-plan.tokens // plan.sp):,} per rank with sp {plan.sp})" if plan.sp > 1 else ""
    ckpt = ", ".join(f"{r} {'on' if v else 'off'}" for r, v in plan.checkpointing.items())
    vsa = f"VSA sparsity {plan.vsa_sparsity:g}" if plan.vsa_sparsity > 0 else "VSA off"
    lines = [
        f"megadmd plan: {plan.model}, {params}",
        f"{video}latent {'x'.join(map(str, plan.latent_shape))} -> {plan.tokens:,} tokens per sample{local}",
        f"layout {plan.nodes} node(s) x {plan.gpus_per_node} GPUs = {plan.world_size} ranks (dp {plan.dp} x sp "
        f"{plan.sp}); micro batch {plan.micro_batch}; {plan.precision}; offload {plan.offload}",
        f"activation checkpointing: {ckpt}; {vsa}; EMA {'on' if plan.ema else 'off'}",
        "",
    ]
    rows = [("item", "role", "where", "GiB", "how")]
    rows += [(i.name, i.role or "-", i.where, f"{i.gib:.2f}", i.how) for i in plan.items]
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    for r in rows:
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  "
                     f"{r[3]:>{widths[3]}}  {r[4]}".rstrip())
    phases = ", ".join(f"{p} {g:.2f}" for p, g in plan.phases.items())
    lines += [
        "",
        f"transient GPU GiB by phase: {phases}",
        f"GPU per rank: {plan.gpu_total_gib:.2f} GiB of {plan.gpu_memory_gib:g} (peak: {plan.peak_phase})",
        f"CPU per rank: {plan.cpu_total_gib:.2f} GiB; per node: {plan.cpu_total_gib * plan.gpus_per_node:.2f} GiB",
        plan.reason,
    ]
    return "\n".join(lines)
