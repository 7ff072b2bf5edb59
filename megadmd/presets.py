"""Named presets: a model architecture plus the published (or, for ``tiny``, tuned) recipe.

A preset is a partial config tree applied on top of the dataclass defaults and below the user's
file and overrides. ``tiny`` is the built-in default: a Wan DiT of about half a million
parameters, the embedded toy teacher, and the toy dataset; ``megadmd train`` with no arguments
distills it on a CPU in a few minutes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .config import ConfigError

# The tiny Wan architecture (diffusers WanTransformer3DModel kwargs). It is also the architecture
# of the toy teacher that ships in megadmd/assets/toy_teacher.
TINY_WAN_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=24,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=64,
    ffn_dim=384,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=256,
)

# Wan2.1 architectures (diffusers configs of the released checkpoints).
WAN21_1_3B_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
WAN21_14B_CONFIG: dict[str, Any] = dict(
    WAN21_1_3B_CONFIG, num_attention_heads=40, ffn_dim=13824, num_layers=40,
)
# Wan2.2-TI2V-5B: 48 latent channels from its 4x16x16 VAE.
WAN22_TI2V_5B_CONFIG: dict[str, Any] = dict(
    WAN21_1_3B_CONFIG, num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30,
)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: dict  # partial RunConfig tree
    wan_config: Optional[dict] = None  # architecture, for built-in models and the memory planner
    builtin: bool = False  # teacher and data ship with the package (the toy problem)
    aliases: tuple = field(default_factory=tuple)
    video_size: Optional[tuple] = None  # (frames, height, width) in pixels of the published recipe
    vae_scale: tuple = (4, 8)  # (temporal, spatial) compression of the model's VAE
    # partial config tree applied only when the run uses the built-in data (no data.path), below
    # the user's file and overrides: the recipe tuned on the built-in problem, including parts
    # that need what only it provides (the toy teacher's regression pairs)
    builtin_data_config: dict = field(default_factory=dict)

    def latent_shape(self, video_size: Optional[tuple] = None) -> tuple:
        """[C, F, H, W] of the latent for a (frames, height, width) video."""
        frames, height, width = video_size or self.video_size
        t, sp = self.vae_scale
        return (self.wan_config["in_channels"], (frames - 1) // t + 1, height // sp, width // sp)


_WAN21_RECIPE = {
    "dmd": {
        "denoising_steps": [1000, 757, 522],
        "min_timestep_ratio": 0.02,
        "max_timestep_ratio": 0.98,
        "guidance_scale": 3.5,
        "cfg_form": "offset",
        "generator_update_interval": 5,
    },
    "optim": {
        "generator": {"lr": 2e-6, "weight_decay": 0.01},
        "fake_score": {"lr": 2e-6, "weight_decay": 0.01},
    },
    "train": {"max_grad_norm": 1.0, "max_steps": 4000, "micro_batch_size": 1},
    "data": {"text_len": 512},
    "model": {"activation_checkpointing": {"generator": True, "fake_score": True, "teacher": True}},
    "ema": {"decay": 0.999},
    "checkpoint": {"interval_steps": 500, "keep_last": 3},
}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


PRESETS: dict[str, Preset] = {}


def _register(p: Preset) -> None:
    PRESETS[p.name] = p
    for a in p.aliases:
        PRESETS[a] = p


_register(Preset(
    name="tiny",
    description="toy Wan DiT (~0.5M params), embedded toy teacher and toy data; runs on a CPU",
    wan_config=TINY_WAN_CONFIG,
    builtin=True,
    aliases=("toy",),
    config={
        "output_dir": "runs/megadmd-tiny",
        "dmd": {
            "denoising_steps": [1000, 757, 522],
            "flow_shift": 3.0,
            "min_timestep_ratio": 0.02,
            "max_timestep_ratio": 0.98,
            "guidance_scale": 3.5,
            "cfg_form": "offset",
            "generator_update_interval": 5,
        },
        "optim": {
            # (a dataset of your own; the built-in data gets builtin_data_config below) generator
            # lr 4x below the fake score's, and only 25 generator updates (125 iterations): in
            # plain DMD2 the toy's mode spread erodes with every generator update
            "generator": {"lr": 5e-5, "betas": [0.0, 0.999], "weight_decay": 0.0},
            "fake_score": {"lr": 2e-4, "betas": [0.0, 0.999], "weight_decay": 0.0},
        },
        # one torch thread: the toy's ops are too small to share out (1.8x faster on 2 cores, BENCHMARKS.md)
        "train": {"max_steps": 125, "micro_batch_size": 8, "max_grad_norm": 1.0, "seed": 0, "cpu_threads": 1},
        "logging": {"interval_steps": 10},
        "validation": {"interval_steps": 25},  # the toy quality metrics (megadmd/toy/quality.py)
        "checkpoint": {"interval_steps": 100, "keep_last": 2},
    },
    # The recipe tuned on the built-in toy problem (docs/quality-benchmark.md has an ablation row
    # for each part), applied only when the run trains on the built-in data (no data.path):
    # - data-free: the generator makes its own inputs (synthetic-latent mode drifts modes faster);
    # - the first step (pure-noise input) is not trained by DMD, whose gradient drags that one
    #   point per prompt to one mode; DMD v1's regression on 512 pairs of the toy teacher's
    #   16-step ODE (shipped in assets/toy_pairs; toy.builtin.write_toy_pairs), trains it;
    # - guidance only at t <= 750 in the DMD real score;
    # - generator lr 2e-4, updated every 2nd iteration: 200 updates in 400 iterations (every 5th,
    #   the plain recipe's, gives 80: less precision, a larger Frechet distance);
    # - the generator's EMA (decay 0.9 from iteration 150), which is what the quality hook scores
    #   under quality_ema/ and `megadmd export-ema` ships: the live weights move from one
    #   validation to the next, the EMA holds the lowest distance;
    # - DMD2's GAN term at a generator weight of 1.0 instead of the paper's 1e-3: with the
    #   four-block teacher it lowers Frechet by 23% on the mean of three training seeds at the same
    #   precision (0.3 and 0.5 lowered it by less than the 20% the benchmark asks for;
    #   docs/quality-search.md);
    # - ZeRO-3 leaf blocks (deepspeed.leaf_blocks): the same numbers from fewer hook calls, which is
    #   what fits the 200 updates into the default job's 5 minutes (docs/quality-search.md).
    # With a dataset of your own, the pairs come from 'megadmd synth --save-noise' and you set
    # dmd.regression.weight; the rest of the tiny preset is the plain DMD2 recipe above.
    builtin_data_config={
        "dmd": {"simulate_generator_forward": True, "train_first_step": False, "guidance_interval": [0.0, 0.75],
                "generator_update_interval": 2, "regression": {"weight": 1.0, "num_steps": 1, "batch_size": 32},
                "gan": {"enabled": True, "generator_weight": 1.0}},
        "optim": {"generator": {"lr": 2e-4}},
        "train": {"max_steps": 400},
        "validation": {"interval_steps": 50},
        "ema": {"decay": 0.9, "start_step": 150},
        "deepspeed": {"leaf_blocks": True},
    },
))
_register(Preset(
    name="wan2.1-t2v-1.3b",
    description="Wan2.1-T2V-1.3B, FastVideo's published DMD recipe (shift 8, steps 1000,757,522)",
    wan_config=WAN21_1_3B_CONFIG,
    video_size=(77, 448, 832),  # the Wan-Syn set: 20 x 56 x 104 latents, 29,120 tokens
    config=_merge(_WAN21_RECIPE, {"dmd": {"flow_shift": 8.0}}),
))
_register(Preset(
    name="wan2.1-t2v-14b",
    description="Wan2.1-T2V-14B, FastVideo's published DMD recipe (shift 3)",
    wan_config=WAN21_14B_CONFIG,
    video_size=(77, 448, 832),
    config=_merge(_WAN21_RECIPE, {"dmd": {"flow_shift": 3.0}}),
))
_register(Preset(
    name="wan2.2-ti2v-5b",
    description="Wan2.2-TI2V-5B, FastVideo's data-free DMD recipe (shift 5, 121 x 704 x 1280)",
    wan_config=WAN22_TI2V_5B_CONFIG,
    video_size=(121, 704, 1280),  # 31 x 44 x 80 latents, 27,280 tokens
    vae_scale=(4, 16),
    # As examples/distill/Wan2.2-TI2V-5B-Diffusers/Data-free/distill_dmd_t2v_5B.sh runs it: 4,000
    # iterations (FastVideo's docs say 3,000; the script is what ran), both learning rates on
    # cosine_with_min_lr = max(0.5, cos) over those iterations after a 100-iteration linear warm-up
    # (the warm-up and min_lr_ratio flags are shared by both schedulers there).
    config=_merge(_WAN21_RECIPE, {
        "dmd": {"flow_shift": 5.0, "guidance_scale": 3.0, "simulate_generator_forward": True},
        "optim": {"generator": {"lr": 4e-6, "scheduler": "cosine_with_min_lr", "warmup_steps": 100,
                                "min_lr_ratio": 0.5},
                  "fake_score": {"lr": 2e-6, "scheduler": "cosine_with_min_lr", "warmup_steps": 100,
                                 "min_lr_ratio": 0.5}},
        "train": {"max_steps": 4000},
    }),
))


_register(Preset(
    name="wan2.2-t2v-a14b",
    description="Wan2.2-T2V-A14B: two 14B experts (high noise t >= 875, low noise below), 4 steps",
    wan_config=WAN21_14B_CONFIG,  # each expert has the Wan2.1-14B architecture
    video_size=(81, 720, 1280),
    config=_merge(_WAN21_RECIPE, {
        "model": {"boundary_ratio": 0.875},
        "dmd": {"flow_shift": 12.0, "denoising_steps": [1000, 750, 500, 250]},
    }),
))


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset '{name}'; choose one of {', '.join(sorted(PRESETS))}"
        ) from None
