"""``megadmd generate``: few-step sampling with a distilled generator (and a timed teacher baseline).

The generator samples on the DMD schedule: predict x0 at each step, re-noise it with fresh noise
to the next step, no CFG. The steps and the attention (dense, or VSA at the sparsity training
used, gates included) default to what the model's ``megadmd_sampling.json`` records (an export
of megadmd convert / export-ema), else to 1000, 757, 522 and dense. Prompts go through the UMT5
text encoder (by default the model folder's own, for an exported pipeline), or embeddings come
from a megadmd dataset. Latents are saved as safetensors; with a Wan VAE they are also decoded to
mp4 files and a png grid. ``--compare-teacher`` times the teacher at N Euler steps with CFG on
the same prompts, in the same run, and prints both seconds per sample.

Noise (``--noise``), so that sample ``j`` of ``--seed S`` equals diffusers' ``WanPipeline`` on the
exported folder, called with ``num_inference_steps=len(steps), guidance_scale=1.0``:

- ``megadmd`` (default): it starts from ``torch.randn(1, C, F, H, W,
  generator=torch.Generator().manual_seed(S + j))`` (on the CPU) and re-noises as ``DMDScheduler``
  does (megadmd/pipeline/scheduler.py): ``pipe(prompt_j,
  generator=torch.Generator().manual_seed(S + j))`` after ``use_dmd_scheduler(pipe)``. Device-free.
- ``diffusers``: the start and every re-noise come, in that order, from the device's RNG seeded
  ``S + j``: ``torch.manual_seed(S + j); pipe(prompt_j)`` with the export's stock scheduler and no
  ``generator`` (megadmd/pipeline/stock.py), on the same device.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import flow
from .config import ConfigError, check_number, check_steps
from .data.text import WAN_NEGATIVE_PROMPT
from .io_utils import atomic_dir
from .models import check_weight_files, load_role_model, predict_velocity, read_model_config
from .monitoring.progress import progress
from .safety.folders import check_output
from .sampling import cfg_velocity, sample_generator, sample_teacher

log = logging.getLogger("megadmd")
DEFAULT_STEPS = [1000.0, 757.0, 522.0]
ATTENTION_KINDS = ("dense", "vsa")
NOISE_KINDS = ("megadmd", "diffusers")


@dataclass
class GenerateOptions:
    model: str
    out: str
    latent_shape: tuple
    prompts: Optional[str] = None
    text_encoder: Optional[str] = None
    tokenizer: Optional[str] = None
    embeds: Optional[str] = None  # a megadmd dataset: its text embeddings (and negative prompt)
    negative_prompt: str = WAN_NEGATIVE_PROMPT  # the teacher's unconditional prompt (--compare-teacher)
    steps: Optional[list] = None  # None: the model's megadmd_sampling.json, else DEFAULT_STEPS
    seed: int = 0
    noise: str = "megadmd"  # NOISE_KINDS: whose seeding convention sample j follows (module docstring)
    batch_size: int = 1
    precision: str = "auto"
    vae: Optional[str] = None
    compare_teacher: Optional[str] = None
    teacher_steps: int = 50
    guidance_scale: float = 5.0
    cfg_form: str = "standard"
    flow_shift: float = 3.0
    max_text_len: int = 512
    images: Optional[str] = None  # image-to-video: one image per prompt (with image_encoder and vae)
    image_encoder: Optional[str] = None
    video_size: Optional[tuple] = None  # (frames, height, width) the images are encoded for
    attention: Optional[str] = None  # dense | vsa; None: the model's megadmd_sampling.json, else dense
    vsa_sparsity: Optional[float] = None  # None: the model's megadmd_sampling.json
    vsa_backend: str = "auto"
    overwrite: bool = False  # replace a non-empty output folder (megadmd/safety/folders.py)


def with_model_defaults(o: GenerateOptions) -> GenerateOptions:
    """Fill what the options leave open from the model folder: steps and attention from its
    megadmd_sampling.json, the text encoder from an exported pipeline's ``text_encoder/``."""
    from .pipeline.info import read_sampling_info

    info = read_sampling_info(o.model) if Path(o.model).is_dir() else None
    steps = o.steps if o.steps is not None else (info["timesteps"] if info else DEFAULT_STEPS)
    trained_sparsity = float(info["attention"]["vsa_sparsity"]) if info else 0.0
    attention = o.attention or ("vsa" if o.vsa_sparsity is not None or trained_sparsity > 0 else "dense")
    if attention not in ATTENTION_KINDS:
        raise ConfigError(f"--attention must be one of {', '.join(ATTENTION_KINDS)}, got {attention}")
    sparsity = o.vsa_sparsity
    if attention == "dense" and sparsity is not None:
        raise ConfigError("--vsa-sparsity needs --attention vsa")
    if attention == "vsa":
        sparsity = trained_sparsity if sparsity is None else sparsity
        if not 0 < sparsity < 1:
            raise ConfigError(f"--attention vsa needs --vsa-sparsity in (0, 1) (the model records none), got {sparsity}")
    text_encoder = o.text_encoder
    if text_encoder is None and o.prompts is not None and (Path(o.model) / "text_encoder" / "config.json").is_file():
        text_encoder = o.model
    return dataclasses.replace(o, steps=[float(t) for t in steps], attention=attention, vsa_sparsity=sparsity,
                               text_encoder=text_encoder)


def load_conditions(o: GenerateOptions, device) -> tuple[list[torch.Tensor], torch.Tensor, list[str], dict]:
    """Per-sample text embeddings ``[L, D]``, the negative embedding, the captions, and for
    image-to-video the image condition (``image_latents``, ``image_embeds``, one row per sample).

    Every embedding is zero-padded to the length training used (the dataset's ``max_text_len``,
    or ``max_text_len`` for prompts: 512 as in Wan and diffusers' WanPipeline). Wan has no text
    mask, so the padding is part of the condition: padding only to the longest prompt of a batch
    would condition differently from training and make a sample depend on its batch-mates."""
    from .data.loader import pad_text

    if (o.prompts is None) == (o.embeds is None):
        raise ConfigError("give exactly one of --prompts (with --text-encoder) and --embeds (a megadmd dataset)")
    if o.embeds is not None:
        from .data.format import LatentDataset

        ds = LatentDataset(o.embeds)
        samples = [ds.get(i) for i in range(len(ds))]
        image = {}
        if "image_latents" in samples[0]:
            image = {k: torch.stack([s[k] for s in samples]) for k in ("image_latents", "image_embeds")}
        width = ds.info.max_text_len
        return ([pad_text(s["text_embeds"][: s["text_len"]], width)[0] for s in samples],
                pad_text(ds.negative()[0], width)[0], [s["caption"] for s in samples], image)
    from .data.text import encode_prompts, load_text_encoder, read_prompts

    if o.text_encoder is None:
        raise ConfigError("--prompts needs --text-encoder (a UMT5EncoderModel folder or Wan pipeline folder)")
    prompts = read_prompts(o.prompts)
    tok, enc = load_text_encoder(o.text_encoder, o.tokenizer, device, torch.float32)
    embeds = [pad_text(e, o.max_text_len)[0] for e in encode_prompts(tok, enc, prompts, o.max_text_len, device)]
    negative = pad_text(encode_prompts(tok, enc, [o.negative_prompt], o.max_text_len, device)[0], o.max_text_len)[0]
    return embeds, negative, prompts, _encode_image_condition(o, len(prompts), device)


def _encode_image_condition(o: GenerateOptions, count: int, device) -> dict:
    if o.images is None:
        return {}
    from PIL import Image

    from .data.image import encode_images, load_image_encoder, read_image_list
    from .data.video import load_vae

    if o.image_encoder is None or o.vae is None or o.video_size is None:
        raise ConfigError("--images needs --image-encoder, --vae and --video-size")
    processor, encoder = load_image_encoder(o.image_encoder, device)
    images = [Image.open(p).convert("RGB") for p in read_image_list(o.images, count)]
    lat, emb = encode_images(images, processor, encoder, load_vae(o.vae, device), o.video_size, device)
    return {"image_latents": lat, "image_embeds": emb}


def _conditioning(image: dict, idx: list, device, repeat: int = 1) -> dict:
    if not image:
        return {}
    from .data.image import condition_channels

    c = condition_channels(image["image_latents"][idx]).to(device)
    e = image["image_embeds"][idx].to(device)
    return {"condition": torch.cat([c] * repeat), "image_embeds": torch.cat([e] * repeat)}


def _pad(embeds: list[torch.Tensor], device, width: int = 0) -> torch.Tensor:
    width = width or max(e.shape[0] for e in embeds)
    out = torch.zeros(len(embeds), width, embeds[0].shape[1], device=device)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e.to(device)
    return out


def start_noise(seed: int, idx: list, shape, device) -> torch.Tensor:
    """The starting latents of samples ``idx``: sample j from seed ``seed + j`` (module docstring)."""
    from .pipeline.scheduler import start_noise as one

    return torch.cat([one(seed + j, shape) for j in idx]).to(device)


def sample_noise(kind: str, seed: int, idx: list, shape, device) -> tuple:
    """(starting latents of samples ``idx``, the function ``sample_generator`` calls for each
    step's re-noise), in the ``--noise`` convention ``kind`` (module docstring)."""
    if kind == "diffusers":
        from .pipeline.stock import diffusers_noise

        return diffusers_noise(seed, idx, shape, device)
    from .pipeline.scheduler import draw_renoise, renoise_generators

    start = start_noise(seed, idx, shape, device)
    gens = renoise_generators(start)
    # sample_generator asks for step 0, 1, ... once each: the order DMDScheduler draws in
    return start, lambda step: draw_renoise(gens, start.shape, device)


def _timed(fn, device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


@torch.no_grad()
def sample_student(model, embeds: list, o: GenerateOptions, dtype, device, image: dict,
                   on_batch: Optional[Callable[[int], None]] = None) -> tuple[torch.Tensor, float]:
    """Few-step samples of every embedding, and the seconds spent sampling; ``on_batch(n)`` after
    each batch of n (progress, outside the timing)."""
    outs, seconds = [], 0.0
    width = 512 if image else 0  # Wan I2V attention expects 512 text tokens
    for i in range(0, len(embeds), o.batch_size):
        idx = list(range(i, min(i + o.batch_size, len(embeds))))
        text = _pad([embeds[j] for j in idx], device, width)
        cond = _conditioning(image, idx, device)
        noise, renoise = sample_noise(o.noise, o.seed, idx, o.latent_shape, device)
        vfn = lambda x, t, text=text, cond=cond: predict_velocity(model, x, t, text, dtype, **cond)  # noqa: E731
        x0, dt = _timed(lambda: sample_generator(vfn, o.steps, noise, renoise), device)
        outs.append(x0.cpu())
        seconds += dt
        if on_batch is not None:
            on_batch(len(idx))
    return torch.cat(outs), seconds


@torch.no_grad()
def sample_baseline(teacher, embeds: list, negative: torch.Tensor, o: GenerateOptions, dtype,
                    device, image: dict, on_batch: Optional[Callable[[int], None]] = None) -> tuple[torch.Tensor, float]:
    sigmas = flow.euler_sigmas(o.teacher_steps, o.flow_shift)
    outs, seconds = [], 0.0
    for i in range(0, len(embeds), o.batch_size):
        idx = list(range(i, min(i + o.batch_size, len(embeds))))
        both = _pad([embeds[j] for j in idx] + [negative] * len(idx), device, 512 if image else 0)
        b = len(idx)
        cond = _conditioning(image, idx, device, repeat=2)  # CFG drops the text, keeps the image

        def pair(x, t, both=both, b=b, cond=cond):
            v = predict_velocity(teacher, torch.cat([x, x]), torch.cat([t, t]), both, dtype, **cond)
            return v[:b], v[b:]

        noise = start_noise(o.seed, idx, o.latent_shape, device)
        guided = cfg_velocity(pair, o.guidance_scale, o.cfg_form)
        x0, dt = _timed(lambda: sample_teacher(guided, None, noise, sigmas), device)
        outs.append(x0.cpu())
        seconds += dt
        if on_batch is not None:
            on_batch(len(idx))
    return torch.cat(outs), seconds


def check_generate_inputs(o: GenerateOptions) -> dict:
    cfg = read_model_config(o.model, what="generator model")
    if len(o.latent_shape) != 4 or o.latent_shape[0] != cfg.get("out_channels"):
        raise ConfigError(f"latent shape {list(o.latent_shape)} must be C,F,H,W with C = the model's "
                          f"out_channels {cfg.get('out_channels')}")
    if cfg.get("image_dim") is not None and o.images is None and o.embeds is None:
        raise ConfigError("the model is image-to-video: give --images (with --image-encoder, --vae, --video-size) "
                          "or --embeds with image conditions")
    if o.noise not in NOISE_KINDS:
        raise ConfigError(f"--noise must be one of {', '.join(NOISE_KINDS)}, got {o.noise}")
    check_steps("--steps", list(o.steps))
    check_number("--guidance-scale", o.guidance_scale)
    check_number("--flow-shift", o.flow_shift, positive=True)
    pt, ph, pw = cfg.get("patch_size", (1, 2, 2))
    if o.latent_shape[1] % pt or o.latent_shape[2] % ph or o.latent_shape[3] % pw:
        raise ConfigError(f"latent shape {list(o.latent_shape)}: F, H, W must divide by the model's patch "
                          f"size {[pt, ph, pw]}")
    if o.compare_teacher is not None:
        read_model_config(o.compare_teacher, what="teacher model")
    for path, what in ((o.model, "generator model"), (o.compare_teacher, "teacher model")):
        if path is None:
            continue
        two_experts = _boundary_of(path) is not None
        for folder in [Path(path) / "transformer", Path(path) / "transformer_2"] if two_experts else [path]:
            check_weight_files(folder, what=what)
    return cfg


def run_generate(o: GenerateOptions) -> dict:
    from .runner import compute_dtype

    o = with_model_defaults(o)
    model_cfg = check_generate_inputs(o)
    target = check_output(o.out, "generate", o.overwrite, inputs=[o.model, o.embeds, o.compare_teacher, o.prompts,
                                                                   o.images])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(o.precision, device)
    embeds, negative, captions, image = load_conditions(o, device)
    if embeds[0].shape[1] != model_cfg.get("text_dim"):
        raise ConfigError(f"text embeddings have dimension {embeds[0].shape[1]} but the model's text_dim "
                          f"is {model_cfg.get('text_dim')}")
    model = _load_generator(o, dtype, device)
    _warm_up(model, embeds[0], o, dtype, device, image)  # first-call costs out of the timings
    with progress(len(embeds), f"generate ({len(o.steps)} steps)", unit="samples") as bar:
        latents, student_s = sample_student(model, embeds, o, dtype, device, image, on_batch=bar.update)
    result = {"num_samples": len(embeds), "student_steps": len(o.steps), "steps": o.steps,
              "attention": o.attention, "vsa_sparsity": o.vsa_sparsity,
              "student_s_per_sample": student_s / len(embeds)}
    if o.compare_teacher is not None:
        teacher = load_role_model(o.compare_teacher, dtype, _boundary_of(o.compare_teacher),
                                  what="teacher model").to(device).eval()
        _warm_up(teacher, embeds[0], o, dtype, device, image)
        with progress(len(embeds), f"teacher ({o.teacher_steps} steps + CFG)", unit="samples") as bar:
            _, teacher_s = sample_baseline(teacher, embeds, negative, o, dtype, device, image, on_batch=bar.update)
        result.update(teacher_steps=o.teacher_steps, teacher_s_per_sample=teacher_s / len(embeds),
                      speedup=teacher_s / max(student_s, 1e-12))
    _write_outputs(o, latents, captions, result, device, target.replace)
    return result


@torch.no_grad()
def _warm_up(model, embed: torch.Tensor, o: GenerateOptions, dtype, device, image: dict) -> None:
    x = torch.zeros(1, *o.latent_shape, device=device)
    text = _pad([embed], device, 512 if image else 0)
    predict_velocity(model, x, torch.full((1,), 500.0, device=device), text, dtype, **_conditioning(image, [0], device))


def _boundary_of(path: str) -> Optional[float]:
    """A Wan2.2 pipeline folder with transformer_2: its boundary_ratio (from model_index.json)."""
    root = Path(path)
    if not (root / "transformer_2" / "config.json").is_file():
        return None
    index = root / "model_index.json"
    ratio = json.loads(index.read_text()).get("boundary_ratio") if index.is_file() else None
    if ratio is None:
        raise ConfigError(f"{root} holds two experts but no boundary_ratio in model_index.json")
    return float(ratio)


def _load_generator(o: GenerateOptions, dtype, device):
    """The generator as training ran it: with ``o.attention == "vsa"``, the training-time VSA
    processor with the gates found in its folder (zero gates where it has none)."""
    from .attention.processor import VSASettings, configure_attention
    from .models import attach_vsa_gates

    model = load_role_model(o.model, dtype, _boundary_of(o.model), what="generator model")
    if o.attention == "vsa":
        attach_vsa_gates(model, o.model)  # each gate takes its block's dtype and device
        configure_attention(model, vsa=VSASettings(sparsity=o.vsa_sparsity, backend=o.vsa_backend))
    # from_pretrained already loaded at ``dtype``, keeping diffusers' fp32 modules (norms, time
    # embedding) in fp32; a blanket .to(dtype) would cast those too
    return model.to(device=device).eval()


def _write_outputs(o: GenerateOptions, latents: torch.Tensor, captions: list, result: dict, device,
                   replace: bool) -> None:
    """The samples folder, built under a temporary name and renamed into place when complete."""
    from safetensors.torch import save

    with atomic_dir(o.out, replace=replace) as out:
        (out / "latents.safetensors").write_bytes(
            save({"latents": latents.contiguous()}, metadata={"megadmd": json.dumps({"captions": captions})}))
        (out / "timing.json").write_text(json.dumps(result, indent=1) + "\n")
        if o.vae is not None:
            from .data.video import decode_latents, frames_grid, load_vae, write_mp4, write_png

            log.info("generate: decoding %d samples with the VAE", len(latents))
            videos = decode_latents(load_vae(o.vae, device), latents)
            for i, v in enumerate(videos):
                write_mp4(out / f"sample_{i:04d}.mp4", v)
            write_png(out / "grid.png", torch.cat([frames_grid(v) for v in videos], dim=0))
