"""The training loader: a deterministic, resumable stream of micro-batches, sharded by dp rank.

The global sample stream is the concatenation of epochs, each a permutation of the dataset drawn
from ``(seed, epoch)``. Global micro-step ``m`` takes stream positions
``[m * dp * b, (m + 1) * dp * b)``; dp rank ``d`` takes its ``b`` consecutive positions from that
window. Consequences:
- every rank of an sp group (same dp rank) sees the same samples;
- dp=2 with per-rank batch b sees exactly the samples of dp=1 with batch 2b;
- the position of a sample in the stream keys its noise and timesteps (see ``rng.py``), so the
  randomness, too, is the same under any dp layout;
- resuming needs only the micro-step counter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .format import LatentDataset


@dataclass
class Batch:
    positions: torch.Tensor  # [B] int64: global stream positions, the keys of per-sample noise
    text_embeds: torch.Tensor  # [B, L, D]
    text_mask: torch.Tensor  # [B, L] bool
    latents: Optional[torch.Tensor]  # [B, C, F, H, W], or None for text-only (data-free) data
    captions: list
    micro_step: int = 0  # the global micro-step: the same on every rank (keys draws all ranks share)
    image_latents: Optional[torch.Tensor] = None  # [B, C, F, H, W]: image-to-video condition
    image_embeds: Optional[torch.Tensor] = None  # [B, N, D]: CLIP image embedding
    noise: Optional[torch.Tensor] = None  # [B, C, F, H, W]: the teacher's starting noise of each latent
    indices: Optional[torch.Tensor] = None  # [B] int64: dataset indices (key the regression's draws)

    @property
    def size(self) -> int:
        return int(self.positions.shape[0])


def stackable(a: Batch, b: Batch) -> bool:
    """Whether one model call can take both batches' conditioning: the same text length and width,
    and the same image conditioning (none, or of the same shape)."""
    if a.text_embeds.shape[1:] != b.text_embeds.shape[1:]:
        return False
    for name in ("image_latents", "image_embeds"):
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None) or (x is not None and x.shape[1:] != y.shape[1:]):
            return False
    return True


def stack_conditioning(a: Batch, b: Batch) -> Batch:
    """One batch holding the conditioning (text and image) of ``a`` then ``b``, for a model call on
    both batches' inputs at once; it carries no latents. ``stackable(a, b)`` must hold."""
    def cat(x, y):
        return None if x is None else torch.cat([x, y.to(x.device)])
    return Batch(positions=torch.cat([a.positions, b.positions.to(a.positions.device)]),
                 text_embeds=cat(a.text_embeds, b.text_embeds), text_mask=cat(a.text_mask, b.text_mask),
                 latents=None, captions=list(a.captions) + list(b.captions), micro_step=a.micro_step,
                 image_latents=cat(a.image_latents, b.image_latents), image_embeds=cat(a.image_embeds, b.image_embeds))


def pad_text(embed: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (or crop) an embedding ``[L, D]`` to ``length`` tokens; return it and its mask."""
    out = torch.zeros(length, embed.shape[-1], dtype=embed.dtype)
    n = min(length, embed.shape[0])
    out[:n] = embed[:n]
    mask = torch.zeros(length, dtype=torch.bool)
    mask[:n] = True
    return out, mask


class BatchSource:
    def __init__(self, dataset: LatentDataset, *, micro_batch: int, dp_rank: int, dp_size: int,
                 seed: int, text_len: int = 0, device: torch.device | str = "cpu"):
        self.dataset = dataset
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.text_len = text_len or dataset.info.max_text_len
        self.device = torch.device(device)
        self.micro_step = 0  # global micro-steps consumed so far (the resumable state)
        self._perm_epoch = -1
        self._perm: Optional[torch.Tensor] = None
        neg, _ = dataset.negative()
        self._negative, self._negative_mask = pad_text(neg, self.text_len)

    # --- the stream ---------------------------------------------------------------------------
    def _index_at(self, position: int) -> int:
        n = len(self.dataset)
        epoch, offset = divmod(position, n)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            self._perm = torch.randperm(n, generator=g)
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def positions_for(self, micro_step: int) -> list[int]:
        start = (micro_step * self.dp_size + self.dp_rank) * self.micro_batch
        return list(range(start, start + self.micro_batch))

    def next(self) -> Batch:
        positions = self.positions_for(self.micro_step)
        batch = self.collate(positions, self.micro_step)
        self.micro_step += 1
        return batch

    def collate(self, positions: list[int], micro_step: int = 0) -> Batch:
        embeds, masks, lats, caps, img_lats, img_embs, noises, indices = [], [], [], [], [], [], [], []
        for p in positions:
            indices.append(self._index_at(p))
            s = self.dataset.get(indices[-1])
            if "noise" in s:
                noises.append(s["noise"])
            if "image_latents" in s:
                img_lats.append(s["image_latents"])
                img_embs.append(s["image_embeds"])
            e, m = pad_text(s["text_embeds"][: s["text_len"]], self.text_len)
            embeds.append(e)
            masks.append(m)
            caps.append(s["caption"])
            if "latents" in s:
                lats.append(s["latents"])
        dev = self.device
        return Batch(
            positions=torch.tensor(positions, dtype=torch.int64),
            text_embeds=torch.stack(embeds).to(dev),
            text_mask=torch.stack(masks).to(dev),
            latents=torch.stack(lats).to(dev) if lats else None,
            captions=caps,
            micro_step=micro_step,
            image_latents=torch.stack(img_lats).to(dev) if img_lats else None,
            image_embeds=torch.stack(img_embs).to(dev) if img_embs else None,
            noise=torch.stack(noises).to(dev) if noises else None,
            indices=torch.tensor(indices, dtype=torch.int64),
        )

    # --- the unconditional input --------------------------------------------------------------
    def negative(self, batch_size: int) -> torch.Tensor:
        """The negative prompt's embedding, padded like the batch, repeated ``batch_size`` times."""
        return self._negative.to(self.device).unsqueeze(0).expand(batch_size, -1, -1)

    # --- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"micro_step": self.micro_step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.micro_step = int(state["micro_step"])
