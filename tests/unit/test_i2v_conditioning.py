"""Image-to-video: the teacher's CFG pair drops the text and keeps the image in both halves."""
from types import SimpleNamespace

import torch

import megadmd.dmd.trainer as trainer_mod
from megadmd.config import DMDConfig
from megadmd.data.image import condition_channels
from megadmd.data.loader import Batch
from megadmd.dmd.trainer import DMDTrainer


def test_teacher_uncondition_keeps_the_image_and_drops_the_text(monkeypatch):
    g = torch.Generator().manual_seed(0)
    b, text_len, dim = 2, 5, 8
    batch = Batch(positions=torch.arange(b), text_embeds=torch.randn(b, text_len, dim, generator=g),
                  text_mask=torch.ones(b, text_len, dtype=torch.bool), latents=None, captions=["a", "b"],
                  image_latents=torch.randn(b, 4, 3, 2, 2, generator=g), image_embeds=torch.randn(b, 7, 6, generator=g))
    negative = torch.randn(1, text_len, dim, generator=g)
    seen = {}

    def spy(model, x, t, text, dtype, **kw):
        seen.update(x=x, text=text, **kw)
        return torch.zeros_like(x)

    monkeypatch.setattr(trainer_mod, "predict_velocity", spy)
    fake_self = SimpleNamespace(
        models=SimpleNamespace(teacher=SimpleNamespace(module=None), dtype=torch.float32),
        data=SimpleNamespace(negative=lambda n: negative.expand(n, -1, -1)),
        dmd=DMDConfig(guidance_scale=3.5, cfg_form="offset"),
        conditioning=lambda batch, repeat=1: DMDTrainer.conditioning(None, batch, repeat))
    x_t = torch.randn(b, 4, 3, 2, 2, generator=g)
    DMDTrainer.teacher_x0(fake_self, x_t, torch.full((b,), 500.0), batch)
    assert seen["x"].shape[0] == 2 * b
    torch.testing.assert_close(seen["text"][:b], batch.text_embeds)  # conditional half: the caption
    torch.testing.assert_close(seen["text"][b:], negative.expand(b, -1, -1))  # unconditional: negative
    cond = condition_channels(batch.image_latents)
    torch.testing.assert_close(seen["condition"][:b], cond)  # the image stays in both halves
    torch.testing.assert_close(seen["condition"][b:], cond)
    torch.testing.assert_close(seen["image_embeds"][:b], batch.image_embeds)
    torch.testing.assert_close(seen["image_embeds"][b:], batch.image_embeds)
