"""Image-to-video conditioning, as diffusers' Wan I2V pipeline builds it.

A Wan2.1 I2V DiT takes, besides the noisy latent ``[C, F, H, W]``:
- the **condition channels** ``[4 + C, F, H, W]`` concatenated to the noisy latent's channels: a
  4-channel frame mask (ones on the first latent frame, which the given image fills; zeros after)
  followed by the VAE latent of the video "first frame, then black frames" (normalized like every
  latent). For Wan2.1-I2V, ``in_channels`` is 36 = 16 noise + 4 mask + 16 image.
- the **CLIP image embedding** (penultimate hidden layer of a CLIP vision model), as
  ``encoder_hidden_states_image`` for the image cross-attention.

The model predicts the velocity of the noisy channels only. ``megadmd encode-images`` adds the
image latent and the CLIP embedding to a text dataset (data/format.py stores them per sample);
the frame mask is rebuilt from the latent shape when needed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ConfigError

log = logging.getLogger("megadmd")
MASK_CHANNELS = 4  # Wan's VAE compresses 4 frames into one latent frame: one mask channel each


def is_i2v(model_config: dict) -> bool:
    return model_config.get("image_dim") is not None


def expected_in_channels(latent_channels: int, i2v: bool) -> int:
    return latent_channels + (MASK_CHANNELS + latent_channels if i2v else 0)


def frame_mask(batch: int, frames: int, height: int, width: int, device=None) -> torch.Tensor:
    """``[B, 4, F, H, W]``: ones on the first latent frame (the given image), zeros after."""
    mask = torch.zeros(batch, MASK_CHANNELS, frames, height, width, device=device)
    mask[:, :, 0] = 1.0
    return mask


def condition_channels(image_latents: torch.Tensor) -> torch.Tensor:
    """The channels concatenated to the noisy latent: ``[B, 4 + C, F, H, W]``."""
    b, _, f, h, w = image_latents.shape
    return torch.cat([frame_mask(b, f, h, w, image_latents.device), image_latents], dim=1)


def load_image_encoder(path: str | Path, device, dtype=torch.float32):
    """transformers' ``CLIPVisionModel`` and ``CLIPImageProcessor`` from a folder, or from the
    ``image_encoder`` / ``image_processor`` subfolders of a Wan I2V pipeline folder."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    root = Path(path).expanduser()
    enc = next((d for d in (root, root / "image_encoder") if (d / "config.json").is_file()), None)
    proc = next((d for d in (root, root / "image_processor") if (d / "preprocessor_config.json").is_file()), None)
    if enc is None or proc is None:
        raise ConfigError(f"{root} needs a CLIP vision model (config.json) and its image processor "
                          f"(preprocessor_config.json), directly or in image_encoder/ and image_processor/")
    return CLIPImageProcessor.from_pretrained(str(proc)), CLIPVisionModel.from_pretrained(
        str(enc), torch_dtype=dtype).to(device).eval()


@torch.no_grad()
def encode_images(images: list, processor, encoder, vae, video_size: tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL images -> (normalized image latents ``[B, C, F, H, W]``, CLIP embeddings ``[B, N, D]``)."""
    from diffusers.video_processor import VideoProcessor

    frames, height, width = video_size
    clip = encoder(**processor(images=images, return_tensors="pt").to(device), output_hidden_states=True)
    embeds = clip.hidden_states[-2].float().cpu()
    pixels = VideoProcessor(vae_scale_factor=8).preprocess(images, height=height, width=width).to(device)
    video = torch.cat([pixels.unsqueeze(2), pixels.new_zeros(pixels.shape[0], 3, frames - 1, height, width)], dim=2)
    vdtype = next(vae.parameters()).dtype
    z = vae.encode(video.to(vdtype)).latent_dist.mode().float()
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, device=z.device).view(1, -1, 1, 1, 1)
    return ((z - mean) / std).cpu(), embeds


def read_image_list(path: str | Path, count: int) -> list[Path]:
    """Image paths, one per line (or ``{"image": ...}`` per .jsonl line), aligned with a dataset."""
    import json

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"images file not found: {p}")
    from ..io_utils import read_text_utf8

    lines = [ln for ln in read_text_utf8(p, "images file").splitlines() if ln.strip()]
    try:
        paths = [Path(json.loads(ln)["image"] if p.suffix == ".jsonl" else ln.strip()) for ln in lines]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"{p}: every .jsonl line must be an object with an 'image' path") from None
    paths = [q if q.is_absolute() else p.parent / q for q in paths]
    if len(paths) != count:
        raise ConfigError(f"{p} lists {len(paths)} images but the text dataset has {count} samples; "
                          f"give one image per prompt, in the same order")
    for q in paths:
        if not q.is_file():
            raise ConfigError(f"image not found: {q}")
    return paths


def _encode_shard(k: int, info, text_data: Path, root: Path, paths: list, encoders: tuple, video_size: tuple,
                  batch_size: int, device, bar) -> None:
    """Shard k of the text dataset with its image conditions, written to ``root``."""
    from PIL import Image

    from .format import read_shard, write_shard

    shard = read_shard(text_data, k)
    first = info.shards[k]["first_index"]
    lats, embs = [], []
    n = shard["text_lens"].shape[0]
    for i in range(0, n, batch_size):
        imgs = [Image.open(paths[first + j]).convert("RGB") for j in range(i, min(i + batch_size, n))]
        lat, emb = encode_images(imgs, *encoders, video_size, device)
        lats.append(lat)
        embs.append(emb)
        bar.update(len(imgs))
    lens = shard["text_lens"].tolist()
    write_shard(root, k, text_embeds=[shard["text_embeds"][j, : lens[j]] for j in range(n)],
                captions=shard["captions"], first_index=first, max_text_len=info.max_text_len,
                text_dim=info.text_dim, latents=shard.get("latents"), image_latents=torch.cat(lats),
                image_embeds=torch.cat(embs))


def run_encode_images(text_data: str, images: str, out: str, image_encoder: str, vae: str,
                      video_size: tuple, batch_size: int = 8, precision: str = "auto", overwrite: bool = False):
    """A copy of a text dataset with each sample's image condition added. Collective when
    launched on several ranks (shard k goes to rank k % world); resumable shard by shard."""
    from ..monitoring.progress import progress
    from ..parallel.init import init_distributed
    from ..runner import compute_dtype
    from .format import DatasetInfo, LatentDataset, existing_shard, read_index, read_shard, write_index, write_negative
    from .video import load_vae

    from ..safety.folders import begin_output, check_output, content_sha256

    info = read_index(text_data)
    paths = read_image_list(images, info.num_samples)
    settings = {"text_data": str(Path(text_data).resolve()), "images": str(Path(images).resolve()),
                "images_sha256": content_sha256(images), "image_encoder": str(Path(image_encoder).resolve()),
                "vae": str(Path(vae).resolve()), "video_size": list(video_size), "precision": precision}
    target = check_output(out, "encode-images", overwrite, inputs=[text_data, images, image_encoder, vae],
                          settings=settings)
    proc = init_distributed()
    dtype = compute_dtype(precision, proc.device)
    processor, encoder = load_image_encoder(image_encoder, proc.device, dtype)
    vae_model = load_vae(vae, proc.device)
    root = Path(out)
    if proc.rank == 0:
        begin_output(target, "encode-images", settings)
    dist.barrier()
    mine = [k for k in range(proc.rank, len(info.shards), proc.world_size) if existing_shard(root, k) is None]
    with progress(sum(info.shards[k]["num_samples"] for k in mine), "encode-images", unit="images",
                  rank=proc.rank, world_size=proc.world_size) as bar:
        for k in mine:
            _encode_shard(k, info, Path(text_data), root, paths, (processor, encoder, vae_model), video_size,
                          batch_size, proc.device, bar)
    dist.barrier()
    sample = read_shard(root, 0)
    shape = {"latent_shape": list(sample["image_latents"].shape[1:]), "embed_shape": list(sample["image_embeds"].shape[1:])}
    result = DatasetInfo(num_samples=info.num_samples, text_dim=info.text_dim, max_text_len=info.max_text_len,
                         shard_size=info.shard_size, latent_shape=info.latent_shape,
                         shards=[existing_shard(root, k) for k in range(len(info.shards))],
                         extra=dict(info.extra, images=str(images), written_by="encode-images"),
                         image_condition=shape)
    if proc.rank == 0:
        neg, caption = LatentDataset(text_data).negative()
        write_negative(root, neg, caption)
        write_index(root, result)
    dist.barrier()
    return result
