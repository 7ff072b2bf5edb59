"""The config tree: dataclasses, loading from YAML/JSON, ``--set`` overrides, validation, saving.

Resolution order, later wins: dataclass defaults < the preset named by ``preset`` < the config
file < command-line overrides. Unknown keys and wrong types raise ``ConfigError`` naming the key.
Functions elsewhere receive the sub-config they use (``cfg.dmd``, ``cfg.optim.generator``), never
the whole tree.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROLES = ("generator", "fake_score", "teacher")
TRAINABLE_ROLES = ("generator", "fake_score")


class ConfigError(ValueError):
    """Bad user input. The message is one line that names what to fix."""


@dataclass
class RoleFlags:
    generator: bool = False
    fake_score: bool = False
    teacher: bool = False


# LoRA's default targets: every Linear of the attention blocks (self- and cross-attention
# q, k, v, out; the FFN), matched by peft's rules (a name equal to, or ending in, an entry).
LORA_DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


@dataclass
class LoRAConfig:
    """LoRA distillation (docs/lora.md): the listed roles train a low-rank adapter over the
    teacher's frozen weights, which then exist once per rank for all three roles."""

    enabled: bool = False
    rank: int = 64  # LightX2V's LoRA distillation of Wan 14B uses 64
    # the adapter's output is scaled by alpha / rank (peft's convention); None: alpha = rank, scale 1
    alpha: Optional[float] = None
    target_modules: list = field(default_factory=lambda: list(LORA_DEFAULT_TARGETS))
    roles: list = field(default_factory=lambda: ["generator", "fake_score"])


@dataclass
class ModelConfig:
    # Diffusers-format folders (or a pipeline folder with a ``transformer`` subfolder).
    # "" for teacher means the preset's built-in model; "" for the others means "same as teacher",
    # as in FastVideo.
    teacher_path: str = ""
    generator_path: str = ""
    fake_score_path: str = ""
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    # recompute each block in backward instead of storing its activations (the teacher never
    # runs backward, so its flag only matters for symmetry with FastVideo's recipes)
    activation_checkpointing: RoleFlags = field(default_factory=RoleFlags)
    # Wan2.2 two-expert models: every role path is a pipeline folder with transformer (high-noise,
    # t >= boundary_ratio * 1000) and transformer_2 (low-noise). None: one transformer per role.
    boundary_ratio: Optional[float] = None
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class DataConfig:
    # a megadmd dataset folder, or a FastVideo preprocessed parquet folder (read in place);
    # "" means the preset's built-in data
    path: str = ""
    format: str = "auto"  # auto (index.json: megadmd; *.parquet: fastvideo) | megadmd | fastvideo
    # FastVideo data only: the negative prompt's embedding (a negative.safetensors from
    # `megadmd encode-text`, or a folder holding one) -- FastVideo's parquet has none
    negative_path: str = ""
    # FastVideo data only: the VAE whose latents_mean/latents_std normalize its raw latents ("":
    # the teacher pipeline's vae/, else the Wan preset's built-in constants)
    vae_path: str = ""
    text_len: int = 0  # pad text embeddings to this many tokens; 0 means the dataset's longest
    latent_shape: list = field(default_factory=list)  # [C, F, H, W] to generate in data-free mode


@dataclass
class GANConfig:
    """DMD2's GAN term (off by default; needs a dataset with real latents, in either training mode)."""

    enabled: bool = False
    block_index: Optional[int] = None  # fake-score block whose output tokens feed the head; None: middle
    generator_weight: float = 1e-3  # the paper uses 3e-3 (ImageNet), 1e-3 (SD1.5), 5e-3 (SDXL)
    discriminator_weight: float = 1e-2
    hidden_dim: int = 256
    pooling: str = "meanstd"  # head features pooled over tokens: mean | meanstd (mean and std, concatenated)
    # [lo, hi] of t / 1000 where real and generated latents are judged (uniform; a pair shares its
    # timestep and noise). At high noise the two look alike and the head learns nothing there
    # (tools/gan_probe.py, docs/quality-benchmark.md)
    timestep_range: list = field(default_factory=lambda: [0.02, 0.5])
    # the head's own param group in the fake score's optimizer: lr = head_lr_scale * optim.fake_score.lr
    # (same schedule), and its own Adam betas
    head_lr_scale: float = 10.0
    head_betas: list = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class RegressionConfig:
    """DMD v1's regression on teacher ODE pairs (off by default; docs/quality-benchmark.md).

    The student's chain runs from each pair's stored starting noise, re-noising between its steps
    with draws keyed by the pair's dataset index (the same every time), and the x0 it reaches is
    pulled towards the teacher's latent by an MSE. Every step of that chain carries gradient."""

    weight: float = 0.0
    # dataset of (noise, teacher latent) pairs, from `megadmd synth --save-noise`; "" uses data.path
    # (for the built-in toy preset: pairs of the toy teacher's ODE, written at start-up; toy/builtin.py)
    data_path: str = ""
    # how many of dmd.denoising_steps the chain runs from the noise; 0 = all of them. 1 is the
    # one-step regression of DMD v1 on the first step, whose input is pure noise
    num_steps: int = 0
    batch_size: int = 0  # pairs per micro-batch (their own loader); 0 = train.micro_batch_size


@dataclass
class DMDConfig:
    denoising_steps: list = field(default_factory=lambda: [1000, 757, 522])
    warp_denoising_step: bool = False
    flow_shift: float = 8.0
    min_timestep_ratio: float = 0.2
    max_timestep_ratio: float = 0.98
    guidance_scale: float = 3.5
    cfg_form: str = "offset"  # offset: cond + s(cond - uncond); standard: uncond + s(cond - uncond)
    # [lo, hi] timestep ratios (t / 1000) where the teacher's x0 is guided; outside it the DMD
    # target is the conditional prediction alone. [0, 1] (the default) guides at every timestep,
    # as FastVideo does; a limited interval is Kynkaanniemi et al. 2024 (docs/quality-dmd2-analyses.md)
    guidance_interval: list = field(default_factory=lambda: [0.0, 1.0])
    generator_update_interval: int = 5
    grad_norm_mean: str = "sample"  # sample (per-sample mean) | batch (FastVideo's global mean)
    simulate_generator_forward: bool = False
    # false: train the generator (and feed the fake score) at every step but the first, whose
    # pure-noise input makes its output one point per prompt (docs/quality-dmd2-analyses.md)
    train_first_step: bool = True
    gan: GANConfig = field(default_factory=GANConfig)
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    # ablation only: drop the fake score's term from the DMD direction (the generator then just
    # climbs the teacher's score and, as the DMD paper shows, collapses to the nearest mode)
    real_score_only: bool = False


@dataclass
class OptimConfig:
    lr: float = 2e-6
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    # diffusers' get_scheduler names (constant, constant_with_warmup, linear, cosine,
    # cosine_with_restarts, polynomial, piecewise_constant) and FastVideo's cosine_with_min_lr;
    # every length counts iterations (train.max_steps), see roles.py
    scheduler: str = "constant"
    warmup_steps: int = 0  # iterations of linear warm-up from 0 (constant: constant_with_warmup)
    min_lr_ratio: float = 0.0  # floor of cosine, linear and cosine_with_min_lr
    num_cycles: float = 1.0  # cosine_with_restarts: number of hard restarts
    power: float = 1.0  # polynomial: the decay's power
    step_rules: str = ""  # piecewise_constant: diffusers' rules, e.g. "1:1000,0.1:2000,0.01"


@dataclass
class OptimTree:
    generator: OptimConfig = field(default_factory=OptimConfig)
    fake_score: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class TrainConfig:
    max_steps: int = 4000
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    seed: int = 1000
    # what an update with a non-finite batch, x0 prediction, loss or gradient norm does (README,
    # "Non-finite values"): skip (not applied, counted in health/skipped_steps) or stop (exit 2)
    nonfinite: str = "skip"
    # with skip: stop after this many skipped updates in a row of one role (0: never stop)
    max_consecutive_skips: int = 10
    # torch's CPU threads per process during the run (torch.set_num_threads; the caller's count is
    # restored when run_train returns). 0 leaves torch's default. The tiny preset sets 1: its ops
    # are too small to share out, and two threads on a busy 2-core machine run it slower.
    cpu_threads: int = 0


@dataclass
class ParallelConfig:
    sp_size: int = 1
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo


@dataclass
class DeepSpeedConfig:
    # A name in ds_configs/ (without .json) or a path to a JSON file.
    generator: str = "zero3"
    fake_score: str = "zero3"
    teacher: str = "zero3_inference"
    # Fetch each transformer block's parameters as one unit (DeepSpeed's ZeRO-3 leaf modules)
    # instead of module by module: fewer hook calls per forward. Applied to the roles where every
    # block runs once per backward; megadmd.zero.leaf_block_roles says which and logs why not.
    leaf_blocks: bool = False


@dataclass
class CheckpointConfig:
    interval_steps: int = 500  # save every N iterations (0: only at the end); always at the end
    keep_last: int = 3  # keep the newest N checkpoints (0: keep all)
    resume: str = ""  # "" (fresh start), "auto" (newest intact checkpoint in output_dir), or a path
    # resume even though keys that change the optimisation differ from the checkpoint's config
    # (--allow-config-change; megadmd/safety/runfolder.py lists them)
    allow_config_change: bool = False


@dataclass
class EMAConfig:
    decay: float = 0.0  # 0 disables the EMA; FastVideo's CLI default is 0.999
    start_step: int = 0  # first iteration whose generator update starts (and seeds) the EMA


@dataclass
class ValidationConfig:
    interval_steps: int = 0  # sample and log every N iterations (0: off)
    data_path: str = ""  # text-only dataset of prompts; "" uses the first samples of the training data
    num_samples: int = 4
    seed: int = 42
    vae_path: str = ""  # an AutoencoderKLWan folder: log decoded frames and write mp4s
    # samples per prompt from different noises: their mean pairwise distance is the logged sample
    # diversity (validation/<model>/diversity); images and mp4s show the first noise only
    noises_per_prompt: int = 2
    extreme_threshold: float = 3.0  # |x0| beyond this counts as extreme (validation/<model>/x0_extreme_share)


@dataclass
class AttentionConfig:
    """Video Sparse Attention for the generator (the teacher and fake score stay dense)."""

    vsa_sparsity: float = 0.0  # target fraction of key cubes skipped; 0 = dense generator
    vsa_backend: str = "auto"  # auto | torch | flex | triton | fastvideo
    vsa_decay_rate: float = 0.0  # ramp: +rate every interval_steps iterations up to the target
    vsa_decay_interval_steps: int = 1  # (FastVideo's VSA_decay_rate / VSA_decay_interval_steps)

    @property
    def vsa_enabled(self) -> bool:
        return self.vsa_sparsity > 0


LOGGING_BACKENDS = ("tensorboard", "wandb")


@dataclass
class LoggingConfig:
    interval_steps: int = 10  # log line and tracked scalars every N iterations
    backends: list = field(default_factory=lambda: ["tensorboard"])  # tensorboard and/or wandb
    tensorboard: bool = True  # the older switch: false drops tensorboard from the backends
    histograms: bool = True  # generator x0 and DMD-gradient histograms at every logging interval
    wandb_project: str = "megadmd"
    wandb_entity: str = ""  # "" = the W&B default entity of the logged-in user
    wandb_run_name: str = ""  # "" = the output folder's name

    @property
    def active_backends(self) -> list:
        return [b for b in self.backends if b != "tensorboard" or self.tensorboard]


@dataclass
class RunConfig:
    preset: str = "tiny"
    output_dir: str = "runs/megadmd"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    optim: OptimTree = field(default_factory=OptimTree)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ----------------------------------------------------------------------------------------------
# Applying nested dicts onto the dataclass tree, with type checks.


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config key '{key}': wrong type")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"config key '{key}' must be {name}, got {type(value).__name__} {value!r}")


def apply_dict(obj: Any, updates: dict, prefix: str = "") -> None:
    """Apply a nested dict to a dataclass instance in place, checking keys and types."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'")
        tp = hints[key]
        if _is_dataclass_type(tp):
            apply_dict(getattr(obj, key), value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(value, tp, full))


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


# ----------------------------------------------------------------------------------------------
# Files and overrides.


def load_file(path: str | os.PathLike) -> dict:
    """Read a YAML or JSON config file into a nested dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    from .io_utils import read_text_utf8

    text = read_text_utf8(p, "config file")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml  # PyYAML ships with huggingface_hub, which diffusers requires

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # parse errors from either library
        raise ConfigError(f"cannot parse config file {p}: {exc}".splitlines()[0]) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}``. Values are parsed as JSON when they can be."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        if "," in raw and not raw.strip().startswith(("[", "{")):
            value = [_scalar(v) for v in raw.split(",")]
        else:
            value = raw
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def merge(base: dict, extra: dict) -> dict:
    """Deep-merge ``extra`` into a copy of ``base``."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve(file: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Build the run config: defaults, then preset, then file, then overrides; then validate."""
    from .presets import get_preset

    user: dict = load_file(file) if file else {}
    for text in overrides:
        user = merge(user, parse_override(text))
    preset_name = user.get("preset", RunConfig.preset)
    if not isinstance(preset_name, str):
        raise ConfigError("config key 'preset' must be str")
    cfg = RunConfig()
    preset = get_preset(preset_name)
    apply_dict(cfg, preset.config)
    if not (user.get("data") or {}).get("path"):  # the preset's built-in data, if it has any
        apply_dict(cfg, preset.builtin_data_config)
    apply_dict(cfg, user)
    validate(cfg)
    return cfg


def check_number(key: str, value: float, positive: bool = False) -> None:
    """A command-line number: finite and >= 0 (> 0 with ``positive``); one line naming it."""
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ConfigError(f"{key} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")


def check_steps(key: str, steps: Any) -> None:
    """A denoising-step list: numbers (not booleans) in (0, 1000], decreasing."""
    if not isinstance(steps, (list, tuple)) or not steps:
        raise ConfigError(f"{key} must list at least one timestep, e.g. [1000, 757, 522]")
    for s in steps:
        if not _is_number(s) or not 0 < s <= 1000:
            raise ConfigError(f"{key} entries must be numbers in (0, 1000], got {s!r}")
    if list(steps) != sorted(steps, reverse=True):
        raise ConfigError(f"{key} must be in decreasing order, e.g. [1000, 757, 522]")


def validate(cfg: RunConfig) -> None:
    """Checks of values that need no files or processes. One line per problem, first one raised."""
    check_finite(cfg)
    d = cfg.dmd
    check_steps("dmd.denoising_steps", d.denoising_steps)
    if not 0 <= d.min_timestep_ratio < d.max_timestep_ratio <= 1:
        raise ConfigError("need 0 <= dmd.min_timestep_ratio < dmd.max_timestep_ratio <= 1")
    gi = d.guidance_interval
    numeric = isinstance(gi, (list, tuple)) and len(gi) == 2 and all(_is_number(x) for x in gi)
    if not (numeric and 0 <= gi[0] < gi[1] <= 1):
        raise ConfigError(f"dmd.guidance_interval must be [lo, hi] with 0 <= lo < hi <= 1 (timestep / 1000); got {gi}")
    if d.guidance_scale < 0:
        raise ConfigError(f"dmd.guidance_scale must be >= 0, got {d.guidance_scale} (offset form: 0 is the "
                          f"conditional prediction alone; standard form: 1 is)")
    if not d.train_first_step and len(d.denoising_steps) < 2:
        raise ConfigError("dmd.train_first_step=false needs at least two dmd.denoising_steps")
    _choice("dmd.cfg_form", d.cfg_form, ("offset", "standard"))
    _choice("dmd.grad_norm_mean", d.grad_norm_mean, ("sample", "batch"))
    _positive("dmd.generator_update_interval", d.generator_update_interval)
    _positive("dmd.flow_shift", d.flow_shift)
    if d.gan.enabled:
        # (that the data holds real latents is checked in preflight: data-free runs may have them)
        g = d.gan
        if g.generator_weight < 0 or g.discriminator_weight < 0 or g.hidden_dim <= 0 or g.head_lr_scale <= 0:
            raise ConfigError("dmd.gan weights must be >= 0, and dmd.gan.hidden_dim and head_lr_scale positive")
        _choice("dmd.gan.pooling", g.pooling, ("mean", "meanstd"))
        tr = g.timestep_range
        if not (len(tr) == 2 and all(isinstance(x, (int, float)) for x in tr) and 0 <= tr[0] < tr[1] <= 1):
            raise ConfigError(f"dmd.gan.timestep_range must be [lo, hi] with 0 <= lo < hi <= 1 (timestep / 1000); got {tr}")
        if len(g.head_betas) != 2 or not all(0 <= b < 1 for b in g.head_betas):
            raise ConfigError(f"dmd.gan.head_betas must be two numbers in [0, 1), got {g.head_betas}")
    r = d.regression
    if r.weight < 0 or r.batch_size < 0 or not 0 <= r.num_steps <= len(d.denoising_steps):
        raise ConfigError(f"dmd.regression.weight and batch_size must be >= 0 and dmd.regression.num_steps in "
                          f"[0, {len(d.denoising_steps)}] (0: every denoising step); got {r.weight}, {r.batch_size}, "
                          f"{r.num_steps}")
    _choice("model.precision", cfg.model.precision, ("auto", "fp32", "bf16"))
    if cfg.model.boundary_ratio is not None and not 0 < cfg.model.boundary_ratio < 1:
        raise ConfigError(f"model.boundary_ratio must be in (0, 1), got {cfg.model.boundary_ratio}")
    _validate_lora(cfg.model)
    for role in TRAINABLE_ROLES:
        o: OptimConfig = getattr(cfg.optim, role)
        key = f"optim.{role}"
        from .roles import check_schedule  # the schedule names come from the installed diffusers

        check_schedule(o, key)
        _positive(f"{key}.lr", o.lr)
        _positive(f"{key}.eps", o.eps)
        if o.weight_decay < 0:
            raise ConfigError(f"{key}.weight_decay must be >= 0, got {o.weight_decay}")
        if len(o.betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in o.betas):
            raise ConfigError(f"{key}.betas must be two numbers in [0, 1), got {o.betas}")
    t = cfg.train
    for name in ("max_steps", "micro_batch_size", "grad_accum_steps"):
        _positive(f"train.{name}", getattr(t, name))
    if t.max_grad_norm < 0:
        raise ConfigError("train.max_grad_norm must be >= 0 (0 disables clipping)")
    _choice("train.nonfinite", t.nonfinite, ("skip", "stop"))
    if t.max_consecutive_skips < 0:
        raise ConfigError(f"train.max_consecutive_skips must be >= 0 (0: never stop), got {t.max_consecutive_skips}")
    if t.cpu_threads < 0:
        raise ConfigError(f"train.cpu_threads must be >= 0 (0: torch's default), got {t.cpu_threads}")
    _positive("parallel.sp_size", cfg.parallel.sp_size)
    _choice("parallel.backend", cfg.parallel.backend, ("auto", "nccl", "gloo"))
    _positive("logging.interval_steps", cfg.logging.interval_steps)
    for b in cfg.logging.backends:
        _choice("logging.backends entries", b, LOGGING_BACKENDS)
    if len(set(cfg.logging.backends)) != len(cfg.logging.backends):
        raise ConfigError(f"logging.backends lists a backend twice: {cfg.logging.backends}")
    c = cfg.checkpoint
    if c.interval_steps < 0 or c.keep_last < 0:
        raise ConfigError("checkpoint.interval_steps and checkpoint.keep_last must be >= 0")
    if not (cfg.ema.decay == 0 or 0 < cfg.ema.decay < 1) or cfg.ema.start_step < 0:
        raise ConfigError(f"ema.decay must be 0 (off) or in (0, 1), and ema.start_step >= 0; "
                          f"got {cfg.ema.decay}, {cfg.ema.start_step}")
    v = cfg.validation
    if v.interval_steps < 0 or v.num_samples < 1:
        raise ConfigError("validation.interval_steps must be >= 0 and validation.num_samples >= 1")
    if v.noises_per_prompt < 2 or v.extreme_threshold <= 0:
        raise ConfigError(f"validation.noises_per_prompt must be >= 2 (the diversity is a distance between two "
                          f"samples) and validation.extreme_threshold positive; got {v.noises_per_prompt}, "
                          f"{v.extreme_threshold}")
    a = cfg.attention
    if not 0 <= a.vsa_sparsity < 1:
        raise ConfigError(f"attention.vsa_sparsity must be in [0, 1), got {a.vsa_sparsity}")
    _choice("attention.vsa_backend", a.vsa_backend, ("auto", "torch", "flex", "triton", "fastvideo"))
    if a.vsa_decay_rate < 0 or a.vsa_decay_interval_steps < 1:
        raise ConfigError("attention.vsa_decay_rate must be >= 0 and attention.vsa_decay_interval_steps >= 1")
    if cfg.data.text_len < 0:
        raise ConfigError("data.text_len must be >= 0")
    _choice("data.format", cfg.data.format, ("auto", "megadmd", "fastvideo"))
    shape = cfg.data.latent_shape
    if shape and not (len(shape) == 4 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                               for x in shape)):
        raise ConfigError(f"data.latent_shape must be [C, F, H, W], four positive integers; got {shape}")


def check_finite(obj: Any, prefix: str = "") -> None:
    """NaN and infinity are refused in every number of the tree, list entries included: a NaN
    guidance scale, learning rate or shift would otherwise pass every range check below (all
    comparisons with NaN are false) and train on garbage."""
    for f in dataclasses.fields(obj):
        key = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_finite(value, f"{key}.")
        else:
            _check_finite_value(key, value)


def _check_finite_value(key: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value}")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite_value(f"{key}[{i}]", v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite_value(f"{key}.{k}", v)


def _is_number(value: Any) -> bool:
    """A real number: int or float, never a bool (YAML's ``yes`` and JSON's ``true`` are ints to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_lora(model: ModelConfig) -> None:
    """model.lora: a positive rank and alpha, named Linear targets, LoRA roles that start from the
    teacher's weights (they are adapters over them)."""
    lo = model.lora
    if not lo.enabled:
        return
    if lo.rank <= 0 or (lo.alpha is not None and lo.alpha <= 0):
        raise ConfigError(f"model.lora.rank and model.lora.alpha must be positive, got {lo.rank} and {lo.alpha}")
    if not lo.target_modules or not all(isinstance(t, str) and t for t in lo.target_modules):
        raise ConfigError(f"model.lora.target_modules must list Linear module names, e.g. {LORA_DEFAULT_TARGETS}; "
                          f"got {lo.target_modules}")
    if not lo.roles or len(set(lo.roles)) != len(lo.roles) or not set(lo.roles) <= set(TRAINABLE_ROLES):
        raise ConfigError(f"model.lora.roles must list generator and/or fake_score once each, got {lo.roles}")
    for role in lo.roles:
        own = getattr(model, f"{role}_path")
        if own and own != model.teacher_path:
            raise ConfigError(f"model.lora: the {role} is an adapter over the teacher's weights, so "
                              f"model.{role}_path must be empty (or the teacher's path), got {own}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got '{value}'")


def _positive(key: str, value: float) -> None:
    if not value > 0:  # also false for NaN
        raise ConfigError(f"{key} must be positive, got {value}")


def save_resolved(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as JSON, atomically."""
    from .io_utils import atomic_write_text

    atomic_write_text(Path(path), json.dumps(to_dict(cfg), indent=2, sort_keys=False) + "\n")
