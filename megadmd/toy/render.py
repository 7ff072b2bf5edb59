"""Toy latents as a picture: one row per class, its true modes on the left, samples on the right.

A latent ``[C, F, H, W]`` becomes one tile: channels 0-2 as red, green and blue (channel 3 and
beyond are not shown), frames side by side from left to right with a one-pixel gap. Values map
linearly from ``[-value_range, value_range]`` to ``[0, 255]`` (0 is mid-grey), with one fixed
range for every tile so modes and samples compare by eye. The result is a ``uint8 [3, H, W]``
tensor, the layout TensorBoard's ``add_image`` takes; ``add_legend`` writes above the two column
groups what they are and before each row its class (with PIL, which diffusers already needs).
"""
from __future__ import annotations

import torch

from .distribution import ToySpec, modes

TILE_GAP = 2  # pixels between tiles
GROUP_GAP = 8  # pixels between the modes and the samples of a row


def latent_tile(latent: torch.Tensor, value_range: float = 2.5) -> torch.Tensor:
    """``[C, F, H, W]`` to a float ``[3, H, F * (W + 1) - 1]`` image in [0, 1]; frame gaps are 0."""
    c, f, h, w = latent.shape
    rgb = torch.zeros(3, f, h, w + 1)
    shown = min(c, 3)
    rgb[:shown, :, :, :w] = ((latent[:shown].float() / value_range + 1) / 2).clamp(0, 1)
    return rgb.permute(0, 2, 1, 3).reshape(3, h, f * (w + 1))[:, :, :-1]


def render_grid(samples: torch.Tensor, labels: torch.Tensor, spec: ToySpec,
                per_class: int = 6, scale: int = 4, value_range: float = 2.5) -> torch.Tensor:
    """A ``uint8 [3, H, W]`` grid: row k shows the M modes of class k, then the first
    ``per_class`` samples labelled k (blank tiles where a class has fewer). Pixels are
    ``scale`` x ``scale`` blocks."""
    table = modes(spec)
    samples, labels = samples.detach().cpu(), labels.detach().cpu()
    th, tw = latent_tile(table[0, 0], value_range).shape[1:]
    cols = spec.modes_per_class + per_class
    height = spec.num_classes * (th + TILE_GAP) + TILE_GAP
    width = cols * (tw + TILE_GAP) + TILE_GAP + GROUP_GAP
    canvas = torch.zeros(3, height, width)
    for k in range(spec.num_classes):
        row = [table[k, j] for j in range(spec.modes_per_class)]
        row += list(samples[labels == k][:per_class])
        y = TILE_GAP + k * (th + TILE_GAP)
        for col, latent in enumerate(row):
            x = TILE_GAP + col * (tw + TILE_GAP) + (GROUP_GAP if col >= spec.modes_per_class else 0)
            canvas[:, y:y + th, x:x + tw] = latent_tile(latent, value_range)
    canvas = canvas.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return (canvas * 255).round().to(torch.uint8)


HEADER_PX = 16  # the legend's header band
LABEL_PX = 56  # the legend's column of row labels


def grid_caption(spec: ToySpec, per_class: int = 6) -> str:
    """What the grid shows, in words (the image caption)."""
    return (f"One row per class (0-{spec.num_classes - 1}). Left: the class's {spec.modes_per_class} true modes; "
            f"right: the first {per_class} generator samples of that class (fixed noise). A sample is good when it "
            f"looks like one of the modes on its left. Channels 0-2 as RGB, frames side by side, mid-grey = 0.")


def add_legend(grid: torch.Tensor, spec: ToySpec, per_class: int = 6, scale: int = 4,
               value_range: float = 2.5) -> torch.Tensor:
    """``render_grid``'s picture with a header ("true modes" | "generator samples") over its two
    column groups and "class k" before each row; ``uint8 [3, H + 16, W + 56]``."""
    import numpy as np
    from PIL import Image, ImageDraw

    th, tw = latent_tile(modes(spec)[0, 0], value_range).shape[1:]
    _, h, w = grid.shape
    canvas = Image.new("RGB", (w + LABEL_PX, h + HEADER_PX), (0, 0, 0))
    canvas.paste(Image.fromarray(grid.permute(1, 2, 0).numpy()), (LABEL_PX, HEADER_PX))
    draw = ImageDraw.Draw(canvas)
    split = LABEL_PX + (TILE_GAP + spec.modes_per_class * (tw + TILE_GAP)) * scale
    draw.text((LABEL_PX + TILE_GAP * scale, 2), "true modes", fill=(255, 255, 255))
    draw.text((split + GROUP_GAP * scale, 2), "generator samples", fill=(255, 255, 255))
    for k in range(spec.num_classes):
        y = HEADER_PX + (TILE_GAP + k * (th + TILE_GAP)) * scale + th * scale // 2 - 6
        draw.text((4, y), f"class {k}", fill=(255, 255, 255))
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)
