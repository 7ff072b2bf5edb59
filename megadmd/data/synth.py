"""``megadmd synth``: teacher-sampled clean latents for the synthetic-latent training mode.

For every prompt of a text-only dataset (from ``megadmd encode-text``), the teacher samples a
clean latent with N steps of flow-matching Euler and CFG against the dataset's negative prompt,
and the result is written as a synthetic-latent dataset that ``megadmd train`` reads.

Sample ``i`` starts from noise keyed by ``(seed, i)`` alone, and output shard k holds samples
``[k * shard_size, (k + 1) * shard_size)`` of the input; shards are split across ranks (k goes
to rank k % world), written atomically and skipped when present. So a run that is killed and
resumed, on any number of ranks, writes exactly the dataset an uninterrupted run writes: no
duplicates, no gaps.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .. import flow
from ..config import ConfigError, check_number
from ..models import check_weight_files, load_wan, predict_velocity, read_model_config
from ..monitoring.progress import progress
from ..rng import sample_seed
from ..safety.folders import begin_output, check_output
from ..sampling import cfg_velocity, sample_teacher
from .image import condition_channels
from .format import (DatasetInfo, LatentDataset, check_dataset_files, existing_shard, read_index, read_shard,
                     shard_name, write_index, write_negative, write_shard)

log = logging.getLogger("megadmd")
SYNTH_PURPOSE = 101


@dataclass
class SynthOptions:
    teacher: str
    text_data: str
    out: str
    latent_shape: tuple  # [C, F, H, W]
    num_steps: int = 50
    guidance_scale: float = 5.0
    cfg_form: str = "standard"
    flow_shift: float = 3.0
    seed: int = 0
    batch_size: int = 4
    precision: str = "auto"
    vae: Optional[str] = None
    num_decode: int = 0
    save_noise: bool = False  # also store each latent's starting noise (for dmd.regression)
    overwrite: bool = False  # replace an existing output (not one of the same settings: that is continued)

    def settings(self) -> dict:
        """What decides the dataset's content: a rerun with the same settings continues it."""
        return {"teacher": str(Path(self.teacher).resolve()), "text_data": str(Path(self.text_data).resolve()),
                "latent_shape": list(self.latent_shape), "steps": self.num_steps,
                "guidance_scale": self.guidance_scale, "cfg_form": self.cfg_form, "flow_shift": self.flow_shift,
                "seed": self.seed, "precision": self.precision, "save_noise": self.save_noise}


def check_synth_inputs(o: SynthOptions) -> DatasetInfo:
    """Everything that can be checked before a process group or a model exists."""
    info = read_index(o.text_data)
    cfg = read_model_config(o.teacher, what="teacher model")
    if info.text_dim != cfg.get("text_dim"):
        raise ConfigError(f"text embeddings in {o.text_data} have dimension {info.text_dim} but the "
                          f"teacher's text_dim is {cfg.get('text_dim')}; encode with the teacher's text encoder")
    if len(o.latent_shape) != 4 or o.latent_shape[0] != cfg.get("out_channels"):
        raise ConfigError(f"--latent-shape {list(o.latent_shape)} must be C,F,H,W with C = the teacher's "
                          f"out_channels {cfg.get('out_channels')}")
    from ..preflight import check_image_condition

    check_image_condition(o.text_data, info, cfg)
    if info.image_condition is not None and list(o.latent_shape) != info.image_condition["latent_shape"]:
        raise ConfigError(f"--latent-shape {list(o.latent_shape)} differs from the image condition's "
                          f"{info.image_condition['latent_shape']} in {o.text_data}")
    pt, ph, pw = cfg.get("patch_size", (1, 2, 2))
    if o.latent_shape[1] % pt or o.latent_shape[2] % ph or o.latent_shape[3] % pw:
        raise ConfigError(f"--latent-shape {list(o.latent_shape)} does not divide by the patch size {[pt, ph, pw]}")
    if o.num_steps < 1 or o.batch_size < 1:
        raise ConfigError("--steps and --batch-size must be positive")
    if o.cfg_form not in ("standard", "offset"):
        raise ConfigError(f"--cfg-form must be standard or offset, got {o.cfg_form}")
    check_number("--guidance-scale", o.guidance_scale)
    check_number("--flow-shift", o.flow_shift, positive=True)
    check_dataset_files(o.text_data, info)
    check_weight_files(o.teacher, what="teacher model")
    if o.vae is not None:
        from .video import load_vae  # noqa: F401  (import check only)
    if Path(o.out).is_dir():
        check_resumed_noise(Path(o.out), len(info.shards), o.save_noise)
    return info


def _noise(o: SynthOptions, indices: list[int], device) -> torch.Tensor:
    out = []
    for i in indices:
        g = torch.Generator(device=device).manual_seed(sample_seed(o.seed, i, SYNTH_PURPOSE))
        out.append(torch.randn(tuple(o.latent_shape), generator=g, device=device))
    return torch.stack(out)


def ode_sample(teacher, noise: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor, sigmas: list,
               guidance_scale: float, cfg_form: str, dtype, cond: Optional[dict] = None) -> torch.Tensor:
    """The teacher's Euler ODE with CFG from ``noise`` over ``sigmas``; cond and uncond share one
    forward of batch 2B (``cond``: image-to-video inputs, already doubled)."""
    b = noise.shape[0]
    both = torch.cat([text, uncond])

    def v_pair(x, t):
        v = predict_velocity(teacher, torch.cat([x, x]), torch.cat([t, t]), both, dtype, **(cond or {}))
        return v[:b], v[b:]

    with torch.no_grad():
        return sample_teacher(cfg_velocity(v_pair, guidance_scale, cfg_form), None, noise, sigmas)


def synth_shard(o: SynthOptions, teacher, src: LatentDataset, k: int, device, dtype,
                on_batch: Optional[Callable[[int], None]] = None) -> dict:
    """Sample shard k's latents; return what ``write_shard`` needs. ``on_batch(n)`` is called
    after each batch of n samples (progress)."""
    shard = read_shard(Path(o.text_data), k)
    lens = shard["text_lens"].tolist()
    first = k * src.info.shard_size
    n = len(lens)
    sigmas = flow.euler_sigmas(o.num_steps, o.flow_shift)
    negative, _ = src.negative()
    i2v = "image_latents" in shard
    # The teacher sees the text as training will feed it: zero-padded to the dataset's
    # max_text_len (512 for Wan; the I2V attention requires 512). Shards store text padded only to
    # their own longest prompt, and Wan has no text mask, so that width must not leak in.
    width = 512 if i2v else src.info.max_text_len
    text_all = torch.zeros(n, width, shard["text_embeds"].shape[2])
    text_all[:, : shard["text_embeds"].shape[1]] = shard["text_embeds"]
    neg = torch.zeros(width, negative.shape[1])
    neg[: min(width, negative.shape[0])] = negative[:width]
    latents, noises = [], []
    for i in range(0, n, o.batch_size):
        idx = list(range(i, min(i + o.batch_size, n)))
        text = text_all[idx].to(device)
        uncond = neg.to(device).unsqueeze(0).expand(len(idx), -1, -1)
        cond = {}
        if i2v:  # CFG drops the text, keeps the image
            c = condition_channels(shard["image_latents"][idx]).to(device)
            e = shard["image_embeds"][idx].to(device)
            cond = {"condition": torch.cat([c, c]), "image_embeds": torch.cat([e, e])}
        noise = _noise(o, [first + j for j in idx], device)
        latents.append(ode_sample(teacher, noise, text, uncond, sigmas, o.guidance_scale, o.cfg_form, dtype,
                                  cond).cpu())
        noises.append(noise.cpu())
        if on_batch is not None:
            on_batch(len(idx))
    embeds = [shard["text_embeds"][j, : lens[j]] for j in range(n)]
    return dict(text_embeds=embeds, captions=shard["captions"], first_index=first, latents=torch.cat(latents),
                image_latents=shard.get("image_latents"), image_embeds=shard.get("image_embeds"),
                noise=torch.cat(noises) if o.save_noise else None)


def run_synth(o: SynthOptions) -> DatasetInfo:
    """Collective when launched on several ranks; resumable."""
    from ..parallel.init import init_distributed
    from ..runner import compute_dtype

    src_info = check_synth_inputs(o)
    target = check_output(o.out, "synth", o.overwrite, inputs=[o.teacher, o.text_data, o.vae], settings=o.settings())
    proc = init_distributed()
    dtype = compute_dtype(o.precision, proc.device)
    teacher = load_wan(o.teacher, dtype=dtype, what="teacher model").to(proc.device).eval()
    src = LatentDataset(o.text_data)
    root = Path(o.out)
    if proc.rank == 0:
        begin_output(target, "synth", o.settings())
    dist.barrier()
    num_shards = len(src_info.shards)
    mine = [k for k in range(proc.rank, num_shards, proc.world_size) if existing_shard(root, k) is None]
    todo = sum(src_info.shards[k]["num_samples"] for k in mine)
    with progress(todo, "synth", unit="samples", rank=proc.rank, world_size=proc.world_size) as bar:
        for k in mine:
            write_shard(root, k, max_text_len=src_info.max_text_len, text_dim=src_info.text_dim,
                        **synth_shard(o, teacher, src, k, proc.device, dtype, on_batch=bar.update))
    dist.barrier()
    info = DatasetInfo(
        num_samples=src_info.num_samples, text_dim=src_info.text_dim, max_text_len=src_info.max_text_len,
        shard_size=src_info.shard_size, latent_shape=list(o.latent_shape), image_condition=src_info.image_condition,
        shards=[existing_shard(root, k) for k in range(num_shards)], has_noise=o.save_noise,
        extra={"synth": {"teacher": str(o.teacher), "steps": o.num_steps, "guidance_scale": o.guidance_scale,
                         "cfg_form": o.cfg_form, "flow_shift": o.flow_shift, "seed": o.seed},
               "written_by": "synth"})
    if proc.rank == 0:
        neg, caption = src.negative()
        write_negative(root, neg, caption)
        write_index(root, info)
        if o.vae and o.num_decode > 0:
            decode_previews(o, root, proc.device)
    dist.barrier()
    return info


def check_resumed_noise(root: Path, num_shards: int, save_noise: bool) -> None:
    """A resumed synth must store noise in every shard or in none (the index has one flag)."""
    from safetensors import safe_open

    for k in range(num_shards):
        if existing_shard(root, k) is None:
            continue
        with safe_open(str(root / shard_name(k)), framework="pt") as h:
            has = "noise" in h.keys()
        if has != save_noise:
            raise ConfigError(f"{root / shard_name(k)} was written {'with' if has else 'without'} --save-noise; "
                              f"resume with the same setting or write to a new folder")


def decode_previews(o: SynthOptions, root: Path, device) -> None:
    from .video import load_vae, save_previews

    ds = LatentDataset(root)
    n = min(o.num_decode, len(ds))
    latents = torch.stack([ds.get(i)["latents"] for i in range(n)])
    written = save_previews(load_vae(o.vae, device), latents, root / "previews", [f"sample_{i:05d}" for i in range(n)])
    log.info("synth: wrote %d preview files to %s", len(written), root / "previews")
