"""Looking at latents: decode with a Wan VAE (diffusers ``AutoencoderKLWan``), write mp4 and png.

Latents in megadmd datasets are normalized per channel, ``(z - latents_mean) / latents_std`` as
the VAE config defines; decoding undoes that first. mp4 writing needs the optional ``video``
extra (imageio with its ffmpeg binary): ``pip install 'megadmd[video]'``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError


def load_vae(path: str | Path, device, dtype=torch.float32):
    from diffusers import AutoencoderKLWan

    root = Path(path).expanduser()
    for cand in (root, root / "vae"):
        if (cand / "config.json").is_file():
            return AutoencoderKLWan.from_pretrained(str(cand), torch_dtype=dtype).to(device).eval()
    raise ConfigError(f"no AutoencoderKLWan config.json in {root} (nor in {root}/vae)")


@torch.no_grad()
def decode_latents(vae, latents_bcfhw: torch.Tensor) -> torch.Tensor:
    """Normalized latents ``[B, C, F, H, W]`` -> uint8 video ``[B, T, H, W, 3]``."""
    cfg = vae.config
    z = latents_bcfhw.to(next(vae.parameters()).device, next(vae.parameters()).dtype)
    if getattr(cfg, "latents_mean", None) is not None:
        mean = torch.tensor(cfg.latents_mean, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
        z = z * std + mean
    video = vae.decode(z, return_dict=False)[0]  # [B, 3, T, H, W] in [-1, 1]
    video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu()


def frames_grid(video_thwc: torch.Tensor, max_frames: int = 8) -> torch.Tensor:
    """Up to ``max_frames`` frames side by side: ``[H, W * n, 3]`` uint8."""
    step = max(1, video_thwc.shape[0] // max_frames)
    return torch.cat(list(video_thwc[::step][:max_frames]), dim=1)


def write_png(path: str | Path, image_hwc: torch.Tensor) -> None:
    from PIL import Image  # Pillow comes with diffusers

    from ..io_utils import atomic_file

    with atomic_file(path, "wb") as f:
        Image.fromarray(image_hwc.numpy()).save(f, format="PNG")


def write_mp4(path: str | Path, video_thwc: torch.Tensor, fps: int = 16) -> None:
    try:
        import imageio.v2 as imageio
    except ImportError as exc:
        raise ConfigError("writing mp4 needs the 'video' extra: pip install 'megadmd[video]'") from exc
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.mp4")
    with imageio.get_writer(str(tmp), fps=fps, codec="libx264", macro_block_size=1,
                            ffmpeg_log_level="error") as w:
        for frame in video_thwc.numpy():
            w.append_data(frame)
    tmp.replace(path)


def save_previews(vae, latents: torch.Tensor, out_dir: str | Path, names: list[str], fps: int = 16) -> list[Path]:
    """Decode latents and write ``<name>.mp4`` and ``<name>.png`` (a strip of frames) for each."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    videos = decode_latents(vae, latents)
    written = []
    for name, v in zip(names, videos):
        write_mp4(out / f"{name}.mp4", v, fps=fps)
        write_png(out / f"{name}.png", frames_grid(v))
        written += [out / f"{name}.mp4", out / f"{name}.png"]
    return written
