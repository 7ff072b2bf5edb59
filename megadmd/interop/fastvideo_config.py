"""``megadmd convert from-fastvideo-config``: a FastVideo DMD2 launch into a megadmd run config.

Two sources, two trainers (hao-ai-lab/FastVideo):
- a legacy launch script (``torchrun ... fastvideo/training/wan_distillation_pipeline.py --flag
  value ...``, as in ``examples/distill/**``): bash arrays and variables are expanded, then the
  flags of ``fastvideo/fastvideo_args.py`` are read. Its CFG is the offset form
  ``cond + w (cond - uncond)`` (3.5 in the recipes, = standard 4.5).
- a YAML config of the modular trainer (``fastvideo/train``, ``examples/train/configs/**``),
  whose ``DMD2Method`` uses the standard form ``uncond + w (cond - uncond)`` (4.5 in its recipe).

Both are flattened to FastVideo's setting names (the YAML's ``training.optimizer.learning_rate``
is the flag ``learning_rate``), then mapped by one table. Every setting becomes a row: mapped,
changed (mapped with a change, which the row says), or unsupported (why). Settings the source
leaves out that change the run get a row with FastVideo's default, because megadmd's presets
differ (e.g. ``min_timestep_ratio`` 0.2 in FastVideo's CLI, 0.02 in its recipes).
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError

LEGACY, MODULAR = "legacy", "modular"
MAPPED, CHANGED, UNSUPPORTED = "mapped", "changed", "unsupported"

# FastVideo's values for settings a source leaves out (fastvideo_args.py's CLI defaults for the
# legacy trainer; DMD2Method's and the typed YAML config's defaults for the modular one).
DEFAULTS = {
    LEGACY: {"real_score_guidance_scale": 3.5, "min_timestep_ratio": 0.2, "max_timestep_ratio": 0.98,
             "generator_update_interval": 5, "ema_decay": 0.999, "max_grad_norm": None, "weight_decay": 0.0,
             "betas": "0.9,0.999", "fake_score_betas": "0.9,0.999", "lr_scheduler": "constant",
             "fake_score_lr_scheduler": "constant", "lr_warmup_steps": 10, "min_lr_ratio": 0.5, "seed": 42},
    MODULAR: {"real_score_guidance_scale": 1.0, "min_timestep_ratio": 0.0, "max_timestep_ratio": 1.0,
              "generator_update_interval": 1, "ema_decay": None, "max_grad_norm": None, "weight_decay": 0.0,
              "betas": [0.9, 0.999], "lr_scheduler": "constant", "lr_warmup_steps": 0, "min_lr_ratio": 0.5,
              "seed": 0},
}
UNSUPPORTED_WHY = {
    "num_gpus": "the launcher's world size decides", "tp_size": "no tensor parallelism (ZeRO-3 shards instead)",
    "hsdp_replicate_dim": "ZeRO-3 shards over all ranks; ds_configs/ for offload",
    "hsdp_shard_dim": "ZeRO-3 shards over all ranks; ds_configs/ for offload",
    "train_sp_batch_size": "every rank of an sp group takes the same micro-batch",
    "dataloader_num_workers": "the loader reads in the training process",
    "tracker_project_name": "TensorBoard logs go to <output_dir>/tensorboard", "wandb_run_name": "TensorBoard only",
    "project_name": "TensorBoard only", "run_name": "TensorBoard only", "trackers": "TensorBoard only",
    "weight_only_checkpointing_steps": "every checkpoint converts to diffusers (megadmd convert to-diffusers)",
    "resume_from_checkpoint": "FastVideo's DCP checkpoints cannot be resumed; start from converted weights",
    "validation_dataset_file": "validation prompts are a text dataset: encode them with megadmd encode-text "
                               "and set validation.data_path",
    "validation_sampling_steps": "validation samples with dmd.denoising_steps, as FastVideo's DMD pipeline does",
    "validation_guidance_scale": "the distilled generator samples without CFG (FastVideo ignores it too)",
    "log_visualization": "validation logs generator samples", "visualization_steps": "see validation.interval_steps",
    "VSA_cache_tile_buf": "megadmd's VSA does not cache tile buffers", "cache_tile_buf": "not cached",
    "inference_mode": "no effect on training", "pin_cpu_memory": "no effect",
    "tracker": "TensorBoard only", "log_grad_norms": "grad_norm/<role> is always logged",
    "pipeline_target": "validation samples with megadmd's few-step DMD sampler",
    "preprocessed_data_type": "the schema is detected from the parquet columns",
}
for _new, _old in (("dataset_file", "validation_dataset_file"), ("sampling_steps", "validation_sampling_steps"),
                   ("sampling_timesteps", "validation_sampling_steps"), ("guidance_scale", "validation_guidance_scale")):
    UNSUPPORTED_WHY[_new] = UNSUPPORTED_WHY[_old]


@dataclass
class Row:
    source: str
    target: str
    status: str
    note: str = ""


@dataclass
class Conversion:
    trainer: str
    settings: dict  # FastVideo name -> (value, source label), in source order
    out: dict = field(default_factory=dict)  # the megadmd config tree being built
    rows: list = field(default_factory=list)

    def set(self, key: str, value: Any) -> str:
        node = self.out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        return f"{key}={_show(value)}"

    def get(self, name: str, default: Any = None) -> Any:
        if name in self.settings:
            return self.settings[name][0]
        return DEFAULTS[self.trainer].get(name, default)

    def row(self, name: str, targets: list, status: str, note: str = "") -> None:
        label = self.settings[name][1] if name in self.settings else f"(absent) {name}: FastVideo default"
        self.rows.append(Row(label, ", ".join(targets), status, note))


def _show(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")


def _floats(v: Any) -> list:
    return [float(x) for x in (v if isinstance(v, (list, tuple)) else str(v).split(","))]


# ---------------------------------------------------------------------------------------------
# Reading the sources


def _expand(token: str, scalars: dict) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: scalars.get(m.group(1) or m.group(2), m.group(0)), token)


def script_args(text: str) -> tuple[Optional[str], list]:
    """The entry script and its argument tokens from a bash launch script, with ``name=(...)``
    arrays spliced in for ``"${name[@]}"`` and ``$VAR`` expanded from plain assignments. A file
    without a ``.py`` command is read as bare flags."""
    text = re.sub(r"\\\n", " ", text)
    scalars, arrays, loose = {}, {}, []
    entry, args = None, []
    lines = iter(text.splitlines())
    for line in lines:
        m = re.match(r"^\s*(\w+)=\((.*)$", line)
        if m:
            body = m.group(2)
            while not re.search(r"\)\s*(#.*)?$", body):
                body += "\n" + next(lines, ")")
            body = body[:body.rstrip().rfind(")")] if ")" in body else body
            arrays[m.group(1)] = [t for ln in body.splitlines() for t in _split(ln)]
            continue
        m = re.match(r"^\s*(?:export\s+)?(\w+)=(.*)$", line)
        if m:
            value = _split(m.group(2))
            scalars[m.group(1)] = _expand(value[0], scalars) if value else ""
            continue
        tokens = _split(line)
        py = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
        if py is not None and entry is None:  # the launch: its (continued) line holds every argument
            entry, args = tokens[py], tokens[py + 1:]
        elif entry is None:
            loose.extend(tokens)
    out = []
    for t in (args if entry else loose):
        arr = re.fullmatch(r"\$\{(\w+)\[@\]\}", t)
        out.extend([_expand(x, scalars) for x in arrays.get(arr.group(1), [])] if arr else [_expand(t, scalars)])
    return entry, out


def _split(line: str) -> list:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in a line we do not need
        return []


def parse_flags(tokens: list) -> dict:
    """``--name value`` / ``--name=value`` / bare ``--name`` (true), names with ``-`` as ``_``."""
    flags, i = {}, 0
    while i < len(tokens):
        t = tokens[i]
        i += 1
        if not t.startswith("--"):
            continue
        name, eq, value = t[2:].partition("=")
        if not eq:
            if i < len(tokens) and not tokens[i].startswith("--"):
                value, i = tokens[i], i + 1
            else:
                value = True
        flags[name.replace("-", "_")] = (value, f"--{name} {_show(value)}" if value is not True else f"--{name}")
    return flags


# YAML path -> FastVideo setting name (the legacy flag's name where one exists)
_YAML_NAMES = {
    "models.student.init_from": "model_path", "models.teacher.init_from": "real_score_model_path",
    "models.critic.init_from": "fake_score_model_path", "pipeline.flow_shift": "flow_shift",
    "method.rollout_mode": "rollout_mode", "training.dit_precision": "dit_precision",
    "callbacks.grad_clip.max_grad_norm": "max_grad_norm", "callbacks.ema.decay": "ema_decay",
    "callbacks.ema.start_iter": "ema_start_step", "callbacks.validation.every_steps": "validation_steps",
    "training.vsa.sparsity": "VSA_sparsity", "training.vsa.cache_tile_buf": "VSA_cache_tile_buf",
}
_YAML_PER_ROLE = ("_target_", "trainable", "disable_custom_init_weights", "flow_shift", "init_from", "enabled")


def yaml_settings(doc: dict) -> dict:
    """A modular-trainer YAML flattened to FastVideo setting names (leaves under ``method``,
    ``training.<group>`` and ``callbacks.<name>`` keep their own names; per-role keys keep their
    path)."""
    method = str((doc.get("method") or {}).get("_target_", ""))
    if not method.endswith("DMD2Method"):
        raise ConfigError(f"method._target_ is '{method}': megadmd converts FastVideo's DMD2Method configs "
                          f"(distribution_matching/**/dmd2*.yaml) only")
    for role in ("student", "teacher", "critic"):
        target = str(((doc.get("models") or {}).get(role) or {}).get("_target_", ""))
        if target and not target.endswith(".WanModel"):
            raise ConfigError(f"models.{role}._target_ is '{target}': megadmd distills Wan DiTs (WanModel) only")
    out = {}
    for path, value in _leaves(doc):
        name = _YAML_NAMES.get(path)
        if name is None:
            last = path.rsplit(".", 1)[-1]
            name = path if last in _YAML_PER_ROLE else last
        out[name] = (value, f"{path}: {_show(value)}")
    return out


def _leaves(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node


def read_source(path: str | Path) -> Conversion:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"FastVideo config not found: {p}")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse {p}: {str(exc).splitlines()[0]}") from exc
        if not isinstance(doc, dict) or "method" not in doc:
            raise ConfigError(f"{p} is not a FastVideo training YAML (no 'method' section)")
        return Conversion(MODULAR, yaml_settings(doc))
    entry, tokens = script_args(text)
    if entry is not None and "self_forcing" in entry:
        raise ConfigError(f"{p} launches {entry}, FastVideo's self-forcing (causal) trainer; megadmd converts DMD "
                          f"distillation launches (wan_distillation_pipeline.py) only")
    if entry is not None and "distillation_pipeline" not in entry:
        raise ConfigError(f"{p} launches {entry}, not a FastVideo DMD distillation pipeline "
                          f"(wan_distillation_pipeline.py or wan_i2v_distillation_pipeline.py)")
    flags = parse_flags(tokens)
    if not flags:
        raise ConfigError(f"{p} holds no FastVideo flags (--name value)")
    return Conversion(LEGACY, flags)


# ---------------------------------------------------------------------------------------------
# The mapping: FastVideo setting -> (megadmd keys set, status, note)

_SIMPLE = {  # one FastVideo setting, one megadmd key, same meaning
    "max_train_steps": ("train.max_steps", int), "train_batch_size": ("train.micro_batch_size", int),
    "gradient_accumulation_steps": ("train.grad_accum_steps", int), "seed": ("train.seed", int),
    "learning_rate": ("optim.generator.lr", float), "sp_size": ("parallel.sp_size", int),
    "min_timestep_ratio": ("dmd.min_timestep_ratio", float), "max_timestep_ratio": ("dmd.max_timestep_ratio", float),
    "generator_update_interval": ("dmd.generator_update_interval", int), "flow_shift": ("dmd.flow_shift", float),
    "ema_start_step": ("ema.start_step", int), "VSA_sparsity": ("attention.vsa_sparsity", float),
    "checkpoints_total_limit": ("checkpoint.keep_last", int),
    "training_state_checkpointing_steps": ("checkpoint.interval_steps", int), "output_dir": ("output_dir", str),
    "boundary_ratio": ("model.boundary_ratio", float), "warp_denoising_step": ("dmd.warp_denoising_step", _bool),
    "simulate_generator_forward": ("dmd.simulate_generator_forward", _bool),
}
_HANDLERS: dict = {}


def _handles(*names):
    def register(fn):
        for n in names:
            _HANDLERS[n] = fn
        return fn
    return register


_PATHS = {"model_path": "generator_path", "pretrained_model_name_or_path": "generator_path",
          "real_score_model_path": "teacher_path", "fake_score_model_path": "fake_score_path"}


@_handles(*_PATHS)
def _model_path(c, name, v):
    note = ""
    if not Path(str(v)).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(v)):
        note = "a Hugging Face repo id: megadmd reads local folders; download it and put its path here"
    return [c.set(f"model.{_PATHS[name]}", str(v))], CHANGED if note else MAPPED, note


@_handles("data_path")
def _data_path(c, name, v):
    if re.search(r":\d+$", str(v)) or "," in str(v):
        return [], UNSUPPORTED, "several roots with repeat counts: megadmd reads one dataset folder"
    return [c.set("data.path", str(v))], CHANGED, (
        "read in place (data.format auto); FastVideo encodes the negative prompt online, so also set "
        "data.negative_path (megadmd encode-text --negative-prompt ... writes one)")


@_handles("real_score_guidance_scale")
def _guidance(c, name, v):
    w = float(v)
    form = "offset" if c.trainer == LEGACY else "standard"
    targets = [c.set("dmd.guidance_scale", w), c.set("dmd.cfg_form", form)]
    if form == "offset":
        return targets, MAPPED, f"legacy trainer: cond + {w:g}(cond - uncond), i.e. standard CFG {w + 1:g}"
    return targets, MAPPED, f"modular trainer: uncond + {w:g}(cond - uncond), i.e. offset form {w - 1:g}"


@_handles("fake_score_learning_rate")
def _fake_lr(c, name, v):
    lr = float(v)
    if lr == 0.0:  # legacy: 0 means the student's rate
        lr = float(c.get("learning_rate", 0.0))
        return [c.set("optim.fake_score.lr", lr)], CHANGED, "0 means the student's learning rate in FastVideo"
    return [c.set("optim.fake_score.lr", lr)], MAPPED, ""


@_handles("betas", "fake_score_betas")
def _betas(c, name, v):
    role = "fake_score" if name.startswith("fake") else "generator"
    return [c.set(f"optim.{role}.betas", _floats(v))], MAPPED, ""


@_handles("weight_decay")
def _weight_decay(c, name, v):
    wd = float(v)
    return [c.set("optim.generator.weight_decay", wd), c.set("optim.fake_score.weight_decay", wd)], MAPPED, \
        "one setting for both optimizers in FastVideo"


@_handles("max_grad_norm")
def _clip(c, name, v):
    norm = 0.0 if v is None else float(v)
    return [c.set("train.max_grad_norm", norm)], MAPPED, "no clipping" if norm == 0 else "both roles"


@_handles("ema_decay")
def _ema(c, name, v):
    decay = 0.0 if v is None else float(v)
    return [c.set("ema.decay", decay)], MAPPED, "EMA off" if decay == 0 else ""


@_handles("dmd_denoising_steps")
def _steps(c, name, v):
    steps = [int(float(x)) for x in _floats(v)]
    return [c.set("dmd.denoising_steps", steps)], MAPPED, ""


@_handles("rollout_mode")
def _rollout(c, name, v):
    if v not in ("simulate", "data_latent"):
        return [], UNSUPPORTED, f"unknown rollout_mode {v}"
    return [c.set("dmd.simulate_generator_forward", v == "simulate")], MAPPED, \
        "simulate: data-free (DMD2 backward simulation)" if v == "simulate" else "noised dataset latents"


@_handles("enable_gradient_checkpointing_type")
def _ckpt(c, name, v):
    on = v not in (None, "", "none", "None")
    for r in ("generator", "fake_score", "teacher"):
        c.set(f"model.activation_checkpointing.{r}", on)
    targets = [f"model.activation_checkpointing.{{generator,fake_score,teacher}}={_show(on)}"]
    if on and v != "full":
        return targets, CHANGED, f"'{v}' becomes full per-block recomputation"
    return targets, MAPPED, ""


@_handles("mixed_precision", "dit_precision")
def _precision(c, name, v):
    ok = (name, str(v)) in (("mixed_precision", "bf16"), ("dit_precision", "fp32"))
    return [c.set("model.precision", "auto")], MAPPED if ok else CHANGED, \
        "auto: bf16 compute on GPU, fp32 master weights" + ("" if ok else f" (FastVideo asked {v})")


@_handles("training_cfg_rate")
def _cfg_rate(c, name, v):
    if float(v) == 0:
        return [], MAPPED, "0: no text dropout (megadmd has none)"
    return [], UNSUPPORTED, "text-embedding dropout is not implemented (DMD recipes use 0)"


@_handles("VSA_decay_rate", "VSA_decay_interval_steps")
def _vsa_decay(c, name, v):
    interval = int(c.get("VSA_decay_interval_steps", 1))
    if interval <= 1:  # FastVideo ramps only when the interval exceeds 1
        return [c.set("attention.vsa_decay_rate", 0.0)], CHANGED, "FastVideo ramps only with an interval > 1"
    return [c.set("attention.vsa_decay_rate", float(c.get("VSA_decay_rate", 0.01))),
            c.set("attention.vsa_decay_interval_steps", interval)], MAPPED, ""


@_handles("log_validation", "validation_steps")
def _validation(c, name, v):
    if name == "log_validation" or not _bool(c.get("log_validation", c.trainer == MODULAR)):
        return [], MAPPED, "validation runs when validation.interval_steps > 0"
    return [c.set("validation.interval_steps", int(v))], MAPPED, ""


@_handles("num_latent_t", "num_height", "num_width", "num_frames")
def _shape(c, name, v):
    if not _bool(c.get("simulate_generator_forward", c.get("rollout_mode") == "simulate")):
        return [], CHANGED, "the latent shape comes from the dataset"
    from ..presets import get_preset

    preset = get_preset(c.out.get("preset", "wan2.1-t2v-1.3b"))
    if name != "num_latent_t" or not preset.wan_config:
        return [], MAPPED, "with num_latent_t: data.latent_shape"
    t, sp = preset.vae_scale
    shape = [preset.wan_config["out_channels"], int(v), int(c.get("num_height", 0)) // sp,
             int(c.get("num_width", 0)) // sp]
    return [c.set("data.latent_shape", shape)], MAPPED, f"data-free latent [C, T, H/{sp}, W/{sp}]"


_SCHEDULE = ("lr_scheduler", "fake_score_lr_scheduler", "lr_warmup_steps", "min_lr_ratio", "lr_num_cycles", "lr_power")


def _schedule(c: Conversion, role: str, name: str) -> tuple:
    """One role's schedule in megadmd's terms (FastVideo's shared warm-up, floor, cycles, power)."""
    kind = str(c.get(name, "constant"))
    warm, floor = int(c.get("lr_warmup_steps", 0)), float(c.get("min_lr_ratio", 0.5))
    key = f"optim.{role}"
    notes = []
    if kind in ("constant", "linear", "cosine", "constant_with_warmup"):
        floor = 0.0  # FastVideo's min_lr_ratio shapes cosine_with_min_lr only
    elif kind == "cosine_with_min_lr":
        pass
    elif kind == "cosine_with_restarts" and int(c.get("lr_num_cycles", 0)) >= 1:
        c.set(f"{key}.num_cycles", float(c.get("lr_num_cycles")))
        floor = 0.0
    elif kind == "polynomial" and float(c.get("lr_power", 0.0)) > 0:
        c.set(f"{key}.power", float(c.get("lr_power")))
        floor = 0.0
    else:
        return [], UNSUPPORTED, f"'{kind}' with these lr_num_cycles/lr_power has no megadmd schedule"
    if kind == "constant" and warm:
        notes.append(f"FastVideo's constant ignores lr_warmup_steps {warm}")
        warm = 0
    if kind == "constant_with_warmup" and not warm:
        kind = "constant"
    targets = [c.set(f"{key}.scheduler", kind), c.set(f"{key}.warmup_steps", warm),
               c.set(f"{key}.min_lr_ratio", floor)]
    if c.trainer == MODULAR and role == "generator" and (warm or kind not in ("constant",)):
        notes.append("FastVideo's modular trainer steps the student's schedule only on its updates; megadmd "
                     "counts iterations (as the legacy trainer)")
    return targets, CHANGED if notes else MAPPED, "; ".join(notes)


def _map(c: Conversion, name: str, value: Any) -> tuple:
    if name in _SIMPLE:
        key, typ = _SIMPLE[name]
        return [c.set(key, typ(value))], MAPPED, ""
    if name in _HANDLERS:
        return _HANDLERS[name](c, name, value)
    last = name.rsplit(".", 1)[-1]
    if name == "method._target_":
        return [], MAPPED, "DMD2, megadmd's algorithm"
    if last in ("_target_", "disable_custom_init_weights"):
        return [], MAPPED, ("no effect: megadmd loads diffusers Wan DiTs as saved" if name.startswith("models.")
                            else "the callback's settings map below")
    if last == "trainable":
        role = name.split(".")[1]
        ok = _bool(value) == (role != "teacher")
        return [], MAPPED if ok else UNSUPPORTED, "megadmd trains the generator and fake score, freezes the teacher"
    if last == "flow_shift":  # a role's own shift: pipeline.flow_shift wins
        if "flow_shift" in c.settings:
            return [], MAPPED, "pipeline.flow_shift sets dmd.flow_shift"
        return [c.set("dmd.flow_shift", float(value))], MAPPED, ""
    return [], UNSUPPORTED, UNSUPPORTED_WHY.get(name, UNSUPPORTED_WHY.get(last, "no megadmd equivalent"))


def _preset_for(c: Conversion) -> str:
    text = " ".join(str(c.get(n, "")) for n in ("model_path", "pretrained_model_name_or_path", "real_score_model_path"))
    for pattern, preset in (("TI2V-5B", "wan2.2-ti2v-5b"), ("A14B", "wan2.2-t2v-a14b"), ("14B", "wan2.1-t2v-14b"),
                            ("1.3B", "wan2.1-t2v-1.3b")):
        if pattern.lower() in text.lower():
            return preset
    return ""


def convert(c: Conversion) -> None:
    """Fill ``c.out`` and ``c.rows`` from ``c.settings``."""
    preset = _preset_for(c)
    c.set("preset", preset or "wan2.1-t2v-1.3b")
    c.rows.append(Row("(model paths)", f"preset={c.out['preset']}", MAPPED if preset else CHANGED,
                      "architecture and recipe defaults" if preset else
                      "model family not recognized: the preset only fills settings written nowhere below"))
    for name, (value, _) in c.settings.items():
        if name not in _SCHEDULE:
            c.row(name, *_map(c, name, value))
    absent = [n for n in DEFAULTS[c.trainer] if n not in c.settings and n not in _SCHEDULE]
    if c.trainer == LEGACY and "fake_score_learning_rate" not in c.settings and "learning_rate" in c.settings:
        absent.append("fake_score_learning_rate")
    for name in absent:
        c.row(name, *_map(c, name, DEFAULTS[c.trainer].get(name, 0.0)))
    for role, name in (("generator", "lr_scheduler"), ("fake_score", "fake_score_lr_scheduler")):
        if name in c.settings or name in DEFAULTS[c.trainer]:
            c.row(name, *_schedule(c, role, name))
    for name in ("lr_warmup_steps", "min_lr_ratio", "lr_num_cycles", "lr_power"):
        if name in c.settings:
            c.row(name, [], MAPPED, "see the scheduler rows")


def format_table(rows: list) -> str:
    w = [max(len(getattr(r, f)) for r in rows + [Row("FastVideo", "megadmd", "status")]) for f in ("source", "target")]
    w = [min(x, 60) for x in w]
    lines = [f"{'FastVideo':{w[0]}}  {'megadmd':{w[1]}}  {'status':11}  note", f"{'-' * w[0]}  {'-' * w[1]}  {'-' * 11}  ----"]
    for r in rows:
        lines.append(f"{r.source:{w[0]}}  {r.target or '-':{w[1]}}  {r.status:11}  {r.note}".rstrip())
    return "\n".join(lines)


def convert_fastvideo_config(src: str, out: str, overwrite: bool = False) -> Conversion:
    """Read ``src``, write megadmd's YAML to ``out`` (checked by loading it), return the rows."""
    import yaml

    from ..config import resolve
    from ..io_utils import atomic_write_text

    target = Path(out)
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} exists; pass --overwrite to replace it")
    c = read_source(src)
    convert(c)
    trainer = ("the legacy trainer (wan_distillation_pipeline.py): CFG in the offset form" if c.trainer == LEGACY
               else "the modular trainer (fastvideo/train DMD2Method): CFG in the standard form")
    text = (f"# megadmd run config converted from {src}\n# by 'megadmd convert from-fastvideo-config', "
            f"from {trainer}\n" + yaml.safe_dump(c.out, sort_keys=False, default_flow_style=None))
    check = target.parent / f".{target.name}.check.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        check.write_text(text)
        resolve(str(check))  # a converted config that megadmd would refuse is an error here, not at launch
    finally:
        check.unlink(missing_ok=True)
    atomic_write_text(target, text)
    return c
