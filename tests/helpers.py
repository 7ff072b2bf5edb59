"""Shared test helpers: tiny models and datasets built from configs and saved to folders, so the
real loading code runs; a 2-process gloo launcher; a one-process DeepSpeed world."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch

# A Wan DiT small enough for many test iterations: 2 heads (so sp=2 divides), 2 layers.
TEST_WAN_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
    out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
)
TEST_LATENT_SHAPE = [4, 2, 4, 4]  # [C, F, H, W] -> 2 x 2 x 2 = 8 tokens after the (1, 2, 2) patch
TEST_TEXT_LEN = 6
TEST_TEXT_DIM = 32


def save_test_model(path: Path, seed: int = 0, config: dict | None = None) -> Path:
    from megadmd.models import build_wan

    model = build_wan(config or TEST_WAN_CONFIG, seed=seed)
    model.save_pretrained(str(path))
    return path


def save_test_dataset(path: Path, num_samples: int = 16, seed: int = 0, text_only: bool = False,
                      latent_shape=None, with_noise: bool = False) -> Path:
    """``with_noise``: each latent also stores a "starting noise" (dmd.regression's pairs)."""
    from megadmd.data.make import write_random_dataset

    write_random_dataset(path, num_samples=num_samples,
                         latent_shape=None if text_only else list(latent_shape or TEST_LATENT_SHAPE),
                         text_len=TEST_TEXT_LEN, text_dim=TEST_TEXT_DIM, seed=seed, with_noise=with_noise)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    fn(rank, world, *args)
    # An orderly exit: without it a rank can leave while gloo's threads still serve the other
    # one, and the C++ runtime aborts the process ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def spawn(fn, world: int, *args, timeout_s: float = 420) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes on gloo; raise if any fails,
    and fail (rather than hang) if they have not finished after ``timeout_s`` -- a collective that
    only some ranks reach would otherwise wait forever."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(_spawn_entry, args=(world, free_port(), fn, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.time() + timeout_s
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish in {timeout_s:.0f} s (a hang?)")


def cli_env() -> dict:
    """Environment for CLI subprocesses: no launcher variables leak in from the test process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent)] + sys.path)
    return env


TOY_WORDS = ("a cat dog runs on the beach in snow red blue video of bird flies over sea city at night "
             "slow motion close up").split()


def save_tiny_text_encoder(path: Path, d_model: int = TEST_TEXT_DIM) -> Path:
    """A tiny UMT5EncoderModel and a word-level tokenizer, saved like a real text-encoder folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in TOY_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8)
    UMT5EncoderModel(cfg).save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path


def save_tiny_vae(path: Path, z_dim: int = 4) -> Path:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    vae.save_pretrained(str(path))
    return path


def save_tiny_wan22_pipeline(path: Path, boundary_ratio: float = 0.875) -> Path:
    """A diffusers Wan2.2 pipeline folder with two tiny experts, a tiny VAE, UMT5 and tokenizer."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    from megadmd.models import build_wan

    parts = path.parent / f".{path.name}-parts"
    enc = save_tiny_text_encoder(parts / "umt5")
    vae = save_tiny_vae(parts / "vae")
    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(str(enc)),
                       text_encoder=UMT5EncoderModel.from_pretrained(str(enc)),
                       vae=AutoencoderKLWan.from_pretrained(str(vae)),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=build_wan(TEST_WAN_CONFIG, seed=0), transformer_2=build_wan(TEST_WAN_CONFIG, seed=1),
                       boundary_ratio=boundary_ratio)
    pipe.save_pretrained(str(path))
    return path


# A tiny Wan2.1-style image-to-video DiT: 4 noise + 4 mask + 4 image channels, CLIP embeddings of
# width 16 through an image cross-attention.
TEST_I2V_CONFIG = dict(TEST_WAN_CONFIG, in_channels=12, out_channels=4, image_dim=16, added_kv_proj_dim=32)


def save_tiny_clip(path: Path) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=16)).save_pretrained(str(path))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(path))
    return path


def save_test_images(folder: Path, count: int) -> Path:
    """``count`` small PNGs and a list file naming them, one per line."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    names = []
    for i in range(count):
        pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    (folder / "images.txt").write_text("\n".join(names) + "\n")
    return folder / "images.txt"
