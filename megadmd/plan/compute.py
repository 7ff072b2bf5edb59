"""Compute of a DMD2 run on paper: FLOPs of Wan forwards, FLOPs of one training iteration as the
loop in dmd/trainer.py runs it, and the time and GPU-hours that take at a stated utilisation of
a GPU's peak. docs/memory-planner.md ("Time") derives every term and calibrates the utilisation.

Conventions. A multiply-add is 2 FLOPs. Counted: every matmul with weights, and attention's two
products (scores and weighted sum); not counted: norms, activations, RoPE, softmax (elementwise,
a few percent). A backward is twice its forward (input gradients and weight gradients of every
matmul; attention's backward is four products against two). Activation checkpointing recomputes
each block's forward in the backward, and that recompute is counted: the utilisation is of
FLOPs executed, so it stays a property of the hardware and kernels, not of the recipe.

Per rank, with Ulysses sp: a block's token work and its attention (heads are split) divide by
sp; the patch embedding, the condition embedders, the cross-attention K/V of the text and the
output projection run whole on every rank of the sp group (parallel/ulysses.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ..config import ConfigError


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense peak (no structured sparsity), NVIDIA's datasheet
    tf32_tflops: float  # dense peak of the fp32 (TF32) tensor cores
    memory_gib: float  # total memory as torch.cuda reports it (a little under the marketed GB)
    utilisation: float  # default share of the peak the DMD iteration reaches (see the module doc)


# Hopper's default utilisation is calibrated on FastVideo's published 1.3B run (768 H200-hours for
# 4,000 iterations, docs/memory-planner.md); the other GPUs have no published DMD run, so they
# take the same share, an assumption the docs state.
CALIBRATED_UTILISATION = 0.12
GPUS = {g.name: g for g in (
    GPU("a100", 312.0, 156.0, 79.3, CALIBRATED_UTILISATION),
    GPU("a100-40gb", 312.0, 156.0, 39.4, CALIBRATED_UTILISATION),
    GPU("h100", 989.4, 494.7, 79.6, CALIBRATED_UTILISATION),
    GPU("h200", 989.4, 494.7, 139.8, CALIBRATED_UTILISATION),
    GPU("b200", 2250.0, 1100.0, 179.0, CALIBRATED_UTILISATION),
)}


def get_gpu(name: str) -> GPU:
    try:
        return GPUS[name]
    except KeyError:
        raise ConfigError(f"unknown GPU '{name}'; choose one of {', '.join(GPUS)} (or give --peak-tflops)") from None


# ---------------------------------------------------------------------------------------------
# One forward of one sample.


@dataclass(frozen=True)
class ForwardFlops:
    """One forward of one sample, split by how parallelism and checkpointing treat the parts."""

    token_linear: float  # block matmuls with weights on the S video tokens (divide by sp)
    text_linear: float  # cross-attention K/V projections of the T text tokens (whole on every rank)
    attention: float  # attention products, self and cross (divide by sp: the heads are split)
    outside: float  # patch embedding, condition embedders, output projection (whole; not checkpointed)

    def blocks(self, sp: int = 1) -> float:
        """Per rank, the part inside the transformer blocks: what checkpointing recomputes."""
        return self.token_linear / sp + self.text_linear + self.attention / sp

    def per_rank(self, sp: int = 1) -> float:
        return self.blocks(sp) + self.outside

    def backward(self, sp: int = 1, weight_grads: bool = True) -> float:
        """Per rank. Input gradients cost one forward of each matmul, weight gradients another;
        attention's backward is two forwards. ``weight_grads`` False: frozen weights (the fake
        score inside the generator's GAN loss; LoRA's base weights when that lands)."""
        linear = self.token_linear / sp + self.text_linear + self.outside
        return linear * (2 if weight_grads else 1) + 2 * self.attention / sp


@dataclass(frozen=True)
class WanShape:
    """What a Wan forward's FLOPs depend on."""

    d: int  # hidden size (heads x head dim)
    ffn: int
    layers: int
    text_dim: int
    freq_dim: int
    patch_in: int  # in_channels x patch volume
    patch_out: int  # out_channels x patch volume
    tokens: int  # S after the patchify
    text_len: int  # T
    grid: tuple  # (f, h, w) after the patchify, for VSA's cubes

    @classmethod
    def of(cls, wan_config: dict, latent_shape: tuple, text_len: int) -> "WanShape":
        pt, ph, pw = wan_config.get("patch_size", (1, 2, 2))
        _, f, h, w = latent_shape
        grid = (f // pt, h // ph, w // pw)
        c_out = wan_config.get("out_channels") or wan_config["in_channels"]
        return cls(d=wan_config["num_attention_heads"] * wan_config["attention_head_dim"], ffn=wan_config["ffn_dim"],
                   layers=wan_config["num_layers"], text_dim=wan_config["text_dim"], freq_dim=wan_config["freq_dim"],
                   patch_in=wan_config["in_channels"] * pt * ph * pw, patch_out=c_out * pt * ph * pw,
                   tokens=math.prod(grid), text_len=text_len, grid=grid)


def wan_forward_flops(s: WanShape, vsa_sparsity: Optional[float] = None) -> ForwardFlops:
    """One Wan forward of one sample (text-to-video). Per block, with S tokens, T text tokens:

    - self-attention: q, k, v, out projections 4 x 2 S D^2; scores and weighted sum 2 x 2 S^2 D;
    - cross-attention: q and out 2 x 2 S D^2; k and v of the text 2 x 2 T D^2; products 2 x 2 S T D;
    - FFN: 2 x 2 S D F.
    Outside the blocks: patch embedding 2 S (C p) D, time embedder 2 (freq D + D^2), its 6-way
    projection 2 x 6 D^2, text embedder 2 T (text_dim D + D^2), output projection 2 S D (C p).

    ``vsa_sparsity`` (not None: VSA on, as the generator runs it): the self-attention products
    become the fine stage over K = ceil((1 - sparsity) C) of the C 64-token cubes per query cube,
    4 (64 C)(64 K) D, plus the coarse attention between cube means, 4 C^2 D, plus the gate's
    projection 2 S D^2 (attention/vsa.py).
    """
    S, T, D, F, L = s.tokens, s.text_len, s.d, s.ffn, s.layers
    token_linear = 2 * S * D * D * (4 + 2) + 2 * 2 * S * D * F
    self_attention = 4 * S * S * D
    if vsa_sparsity is not None:
        from ..attention.vsa_tiling import vsa_topk

        cubes = math.prod(-(-n // 4) for n in s.grid)
        slots = 64 * cubes  # padded queries (and keys) of the tiled sequence
        self_attention = 4 * slots * 64 * vsa_topk(vsa_sparsity, cubes) * D + 4 * cubes * cubes * D
        token_linear += 2 * S * D * D
    outside = (2 * S * s.patch_in * D + 2 * (s.freq_dim * D + D * D) + 2 * 6 * D * D
               + 2 * T * (s.text_dim * D + D * D) + 2 * S * D * s.patch_out)
    return ForwardFlops(token_linear=L * token_linear, text_linear=L * 2 * 2 * T * D * D,
                        attention=L * (self_attention + 4 * S * T * D), outside=outside)


# ---------------------------------------------------------------------------------------------
# One training iteration.


@dataclass(frozen=True)
class RoleCompute:
    """How a trainable role runs its update."""

    checkpointing: bool = True
    weight_grads: bool = True  # False for a role whose base weights are frozen (LoRA, once it lands)


@dataclass(frozen=True)
class LoopSettings:
    """The parts of a run's config that decide the work of an iteration (dmd/trainer.py)."""

    generator_update_interval: int = 5
    num_steps: int = 3  # entries of dmd.denoising_steps
    train_first_step: bool = True
    data_free: bool = False  # dmd.simulate_generator_forward
    gan_block: Optional[int] = None  # the GAN head's block when dmd.gan.enabled, else None
    micro_batch: int = 1
    grad_accum: int = 1
    generator: RoleCompute = field(default_factory=RoleCompute)
    fake_score: RoleCompute = field(default_factory=RoleCompute)

    @property
    def mean_exit_index(self) -> float:
        """Data-free mode draws the exit step k uniformly from [first trained step, num_steps)."""
        first = 0 if self.train_first_step else 1
        return (first + self.num_steps - 1) / 2


def generator_update_flops(gen: ForwardFlops, dense: ForwardFlops, loop: LoopSettings, sp: int,
                           layers: int) -> dict:
    """Per rank and sample, the generator update's parts (dmd/trainer.py ``generator_step``)."""
    g = loop.generator
    parts = {
        "generator forward": gen.per_rank(sp),
        "generator backward": gen.backward(sp, g.weight_grads) + (gen.blocks(sp) if g.checkpointing else 0.0),
        "fake_score no-grad forward": dense.per_rank(sp),
        "teacher CFG forward (batch 2)": 2 * dense.per_rank(sp),
    }
    if loop.data_free:  # the no-grad prefix of the backward simulation
        parts["generator no-grad simulation"] = loop.mean_exit_index * gen.per_rank(sp)
    if loop.gan_block is not None:
        # a full fake-score forward on x_t, then input gradients (frozen weights: no weight
        # gradients) back through the blocks up to the head's, recomputed there when checkpointed
        frac = (loop.gan_block % layers + 1) / layers
        backward = frac * (dense.token_linear / sp + 2 * dense.attention / sp)
        recompute = frac * dense.blocks(sp) if loop.fake_score.checkpointing else 0.0
        parts["fake_score GAN forward + input backward"] = dense.per_rank(sp) + backward + recompute
    return parts


def fake_score_update_flops(gen: ForwardFlops, dense: ForwardFlops, loop: LoopSettings, sp: int) -> dict:
    """Per rank and sample, the fake-score update's parts (``fake_score_step``): a fresh
    no-grad generator sample, then the fake score's forward and backward (batch 2 with the GAN
    term, whose discriminator sees the real latents in the same forward)."""
    f = loop.fake_score
    samples = 1 + (loop.mean_exit_index if loop.data_free else 0)
    batch = 2 if loop.gan_block is not None else 1
    return {
        "generator no-grad forward": samples * gen.per_rank(sp),
        "fake_score forward + backward": batch * (dense.per_rank(sp) + dense.backward(sp, f.weight_grads)
                                                  + (dense.blocks(sp) if f.checkpointing else 0.0)),
    }


@dataclass
class TimePlan:
    gpu: str
    peak_tflops: float
    utilisation: float
    world_size: int
    max_steps: int
    generator_parts: dict  # per rank per generator update (all micro-batches)
    fake_score_parts: dict  # per rank per fake-score update
    total_flops_per_rank: float  # over all max_steps iterations

    @property
    def flops_per_iteration(self) -> float:
        return self.total_flops_per_rank / self.max_steps

    @property
    def seconds_per_iteration(self) -> float:
        return self.flops_per_iteration / (self.utilisation * self.peak_tflops * 1e12)

    @property
    def hours(self) -> float:
        return self.seconds_per_iteration * self.max_steps / 3600

    @property
    def gpu_hours(self) -> float:
        return self.hours * self.world_size


def plan_time(shape: WanShape, loop: LoopSettings, sp: int, world_size: int, max_steps: int,
              vsa_schedule=None, gpu: str = "h100", peak_tflops: Optional[float] = None,
              utilisation: Optional[float] = None, precision: str = "bf16") -> TimePlan:
    """FLOPs of every iteration 1..max_steps (the generator updates on every
    ``generator_update_interval``-th; VSA's sparsity follows ``vsa_schedule(step)`` when given),
    and the time at ``utilisation`` of the peak."""
    spec = get_gpu(gpu) if gpu else None
    peak = peak_tflops or (spec.bf16_tflops if precision == "bf16" else spec.tf32_tflops)
    util = utilisation if utilisation is not None else spec.utilisation
    if not 0 < util <= 1:
        raise ConfigError(f"utilisation must be in (0, 1], got {util}")
    if peak <= 0 or max_steps < 1:
        raise ConfigError("the peak TFLOP/s and train.max_steps must be positive")
    dense = wan_forward_flops(shape)
    per_sample = loop.micro_batch * loop.grad_accum
    cache: dict = {}

    def phases(sparsity):
        if sparsity not in cache:
            gen = dense if sparsity is None else wan_forward_flops(shape, sparsity)
            cache[sparsity] = ({k: v * per_sample for k, v in
                                generator_update_flops(gen, dense, loop, sp, shape.layers).items()},
                               {k: v * per_sample for k, v in fake_score_update_flops(gen, dense, loop, sp).items()})
        return cache[sparsity]

    total = 0.0
    for step in range(1, max_steps + 1):
        g_parts, f_parts = phases(vsa_schedule(step) if vsa_schedule else None)
        total += sum(f_parts.values())
        if step % loop.generator_update_interval == 0:
            total += sum(g_parts.values())
    g_parts, f_parts = phases(vsa_schedule(max_steps) if vsa_schedule else None)
    return TimePlan(gpu=spec.name if spec else "custom", peak_tflops=peak, utilisation=util, world_size=world_size,
                    max_steps=max_steps, generator_parts=g_parts, fake_score_parts=f_parts,
                    total_flops_per_rank=total)


def format_time(t: TimePlan, interval: int) -> str:
    def pf(x):
        return f"{x / 1e15:.3f} PFLOP" if x >= 1e13 else f"{x / 1e9:.3g} GFLOP"

    g, f = sum(t.generator_parts.values()), sum(t.fake_score_parts.values())
    lines = ["", "compute per rank (FLOPs executed, activation-checkpointing recompute included):",
             f"  generator update, every {interval} iterations: {pf(g)} = "
             + " + ".join(f"{k} {pf(v)}" for k, v in t.generator_parts.items()),
             f"  fake_score update, every iteration: {pf(f)} = "
             + " + ".join(f"{k} {pf(v)}" for k, v in t.fake_score_parts.items()),
             f"  mean per iteration: {pf(t.flops_per_iteration)}",
             f"time: {t.gpu}, {t.peak_tflops:g} TFLOP/s peak at {t.utilisation:.0%} utilisation -> "
             f"{t.seconds_per_iteration:.2f} s per iteration; {t.max_steps:,} iterations -> {t.hours:.1f} h on "
             f"{t.world_size} GPUs = {t.gpu_hours:,.0f} GPU-hours"]
    return "\n".join(lines)
