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
    from megadmd.monitoring.console import quiet_known_warnings

    quiet_known_warnings()  # as the CLI does on every rank (pytest's filters stop at this process)
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


def save_tiny_wan_pipeline(path: Path, boundary_ratio: float | None = None, scheduler=None) -> Path:
    """A diffusers Wan pipeline folder: a tiny DiT, a tiny VAE, UMT5 and tokenizer, and (by
    default) the UniPC scheduler Wan's pipelines ship with. With ``boundary_ratio``, a Wan2.2
    pipeline with two tiny experts."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    from megadmd.models import build_wan

    parts = path.parent / f".{path.name}-parts"
    enc = save_tiny_text_encoder(parts / "umt5")
    vae = save_tiny_vae(parts / "vae")
    experts = {} if boundary_ratio is None else {"transformer_2": build_wan(TEST_WAN_CONFIG, seed=1),
                                                 "boundary_ratio": boundary_ratio}
    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(str(enc)),
                       text_encoder=UMT5EncoderModel.from_pretrained(str(enc)),
                       vae=AutoencoderKLWan.from_pretrained(str(vae)),
                       scheduler=scheduler or UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                                      use_flow_sigmas=True, flow_shift=3.0),
                       transformer=build_wan(TEST_WAN_CONFIG, seed=0), **experts)
    pipe.save_pretrained(str(path))
    return path


def save_tiny_wan22_pipeline(path: Path, boundary_ratio: float = 0.875) -> Path:
    """A diffusers Wan2.2 pipeline folder with two tiny experts, a tiny VAE, UMT5 and tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return save_tiny_wan_pipeline(path, boundary_ratio, FlowMatchEulerDiscreteScheduler(shift=3.0))


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


def random_params(shapes: dict, seed: int, scale: float = 0.2) -> dict:
    """``{name: tensor}`` of the given shapes, drawn in sorted name order (the same on every rank
    and in every process)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(tuple(shapes[n]), generator=g) * scale for n in sorted(shapes)}


def set_zero3_params(module: torch.nn.Module, values: dict) -> None:
    """Overwrite a ZeRO-3 module's parameters on every rank (a gather with a modifier rank, so the
    edit is written back to the partitions)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
        for n, p in module.named_parameters():
            p.data.copy_(values[n])


def assert_same_training(a: dict, b: dict, keys: tuple = (), tol: float = 2e-5) -> None:
    """Two ``train_and_record`` results (tests/distributed/workers.py) logged the same losses and
    gradient norms at the same steps, and ended with the same parameters of both trainable roles."""
    import pytest

    assert [s for s, _ in a["history"]] == [s for s, _ in b["history"]] and a["history"]
    for (_, va), (_, vb) in zip(a["history"], b["history"]):
        for k in ("loss/fake_score", "grad_norm/fake_score") + tuple(keys):
            assert va[k] == pytest.approx(vb[k], rel=1e-4, abs=1e-6), k
        if "loss/generator" in va:
            assert va["loss/generator"] == pytest.approx(vb["loss/generator"], rel=1e-4, abs=1e-7)
            assert va["grad_norm/generator"] == pytest.approx(vb["grad_norm/generator"], rel=1e-4)
    for role in ("generator", "fake_score"):
        sa, sb = a["states"][role], b["states"][role]
        assert sa.keys() == sb.keys()
        worst = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
        assert worst < tol, (role, worst)
def invoke_cli(*args):
    """``megadmd ARGS`` in this process with click's CliRunner (much faster than a subprocess).
    Commands keep the test session's one-process gloo world (``shutdown_distributed`` is skipped),
    and megadmd's log handler is reset so each command's log lines land in its own result."""
    from unittest import mock

    from click.testing import CliRunner

    from megadmd.cli import main

    reset_logging()
    try:
        with mock.patch("megadmd.cli.shutdown_distributed", lambda: None):
            return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        reset_logging()  # the command's handler wrote to the runner's stream, closed now


def reset_logging() -> None:
    """megadmd's logger as before any ``setup_logging``: no handler of its own, records propagate."""
    import logging

    logger = logging.getLogger("megadmd")
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


def tree_digest(path: Path) -> dict:
    """Every file under ``path`` (relative path -> SHA-256 of its bytes) and every folder (-> None):
    equal digests mean the folder was left byte-identical."""
    import hashlib

    path = Path(path)
    if not path.exists():
        return {}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(path.rglob("*"))}


def error_lines(result) -> list:
    """The ``megadmd: error:`` lines a CliRunner result printed on stderr."""
    return [ln for ln in result.stderr.splitlines() if ln.startswith("megadmd: error:")]


def save_poisoned_dataset(path: Path, source: Path, bad: dict) -> Path:
    """A copy of the dataset at ``source`` with sample ``i``'s tensor ``bad[i] = (key, value)``
    (``"latents"`` or ``"text_embeds"``) filled with ``value`` (NaN, infinity)."""
    from megadmd.data.format import DatasetWriter, LatentDataset

    src = LatentDataset(source)
    w = DatasetWriter(path, text_dim=src.info.text_dim, max_text_len=src.info.max_text_len,
                      latent_shape=src.info.latent_shape)
    for i in range(len(src)):
        s = src.get(i)
        emb, lat = s["text_embeds"][: s["text_len"]].clone(), s.get("latents")
        key, value = bad.get(i, (None, None))
        if key == "latents":
            lat = torch.full_like(lat, value)
        elif key == "text_embeds":
            emb = torch.full_like(emb, value)
        w.add(emb, s["caption"], lat)
    w.finish(src.negative()[0])
    return path


def tiny_zero3_engine(grad_accum_steps: int = 1, lr: float = 1e-2, seed: int = 0, module=None, groups=None):
    """A small module (default: a two-layer MLP) under a real ZeRO-3 engine (fp32, AdamW without
    weight decay, a LambdaLR schedule), its config filled in as megadmd fills its roles': for
    tests of what an engine step does or skips."""
    import deepspeed

    from megadmd.config import TrainConfig
    from megadmd.roles import fill_ds_config, load_ds_template

    cfg = fill_ds_config(load_ds_template(str(Path(__file__).parent / "distributed" / "zero3_partition_all.json"),
                                          "test"),
                         TrainConfig(grad_accum_steps=grad_accum_steps), torch.distributed.get_world_size(),
                         bf16=False, trainable=True)
    torch.manual_seed(seed)
    if module is None:
        module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    deepspeed.zero.Init(module=module, config_dict_or_path=cfg)
    opt = torch.optim.AdamW(groups or module.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1.0 / (n + 1))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=cfg)
    return engine


def _rewrite_index(root: Path, **changes) -> None:
    import json

    idx = json.loads((root / "index.json").read_text())
    idx.update(changes)
    (root / "index.json").write_text(json.dumps(idx))


def _rewrite_shard(root: Path, **tensors) -> None:
    """Shard 0 with some tensors replaced (its metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    f = root / "shard-000000.safetensors"
    with safe_open(str(f), framework="pt") as h:
        data = {k: h.get_tensor(k) for k in h.keys()}
        meta = h.metadata()
    data.update(tensors)
    save_file(data, str(f), metadata=meta)


# Ways to damage a dataset written by save_test_dataset, each with a fragment of the one error
# line that must name it. Used by tests/unit/test_dataset_checks.py and tests/e2e/test_bad_inputs.py.
DATASET_DAMAGE = {
    "index says 8x8, latents are 4x4": (
        lambda root: _rewrite_index(root, latent_shape=[4, 2, 8, 8]),
        r"shard-000000.safetensors: 'latents' has shape \[\d+, 4, 2, 4, 4\], index.json says \[\d+, 4, 2, 8, 8\]"),
    "int32 latents": (
        lambda root: _rewrite_shard(root, latents=torch.zeros(16, 4, 2, 4, 4, dtype=torch.int32)),
        r"shard-000000.safetensors: 'latents' is I32, index.json says F32"),
    "fewer samples than the index": (
        lambda root: _rewrite_shard(root, latents=torch.zeros(15, 4, 2, 4, 4)),
        r"shard-000000.safetensors: 'latents' has shape \[15, 4, 2, 4, 4\], index.json says \[16, "),
    "truncated shard": (
        lambda root: _truncate(root / "shard-000000.safetensors", 100),
        r"dataset shard .*shard-000000.safetensors is damaged or truncated"),
    "overwritten shard header": (
        lambda root: _overwrite(root / "shard-000000.safetensors", 8, b"\x00garbage\x00" * 4),
        r"dataset shard .*shard-000000.safetensors is damaged or truncated"),
    "missing shard": (
        lambda root: (root / "shard-000000.safetensors").unlink(),
        r"dataset shard .*shard-000000.safetensors is missing"),
    "text dimension": (
        lambda root: _rewrite_shard(root, text_embeds=torch.zeros(16, 6, 8)),
        r"'text_embeds' has shape \[16, 6, 8\], index.json says \[16, \*, 32\]"),
    "text_lens out of range": (
        lambda root: _rewrite_shard(root, text_lens=torch.full((16,), 99, dtype=torch.int32)),
        r"text_lens outside \[1, \d+\] \(damaged\)"),
    "index without num_samples": (
        lambda root: _drop_index_key(root, "num_samples"),
        r"dataset index .*index.json is damaged: missing or bad entry 'num_samples'"),
    "truncated negative prompt": (
        lambda root: _truncate(root / "negative.safetensors", 50),
        r"dataset negative-prompt file .*negative.safetensors is damaged or truncated"),
}


def _truncate(f: Path, drop_bytes: int) -> None:
    data = f.read_bytes()
    f.write_bytes(data[:-drop_bytes])


def _overwrite(f: Path, offset: int, junk: bytes) -> None:
    data = bytearray(f.read_bytes())
    data[offset:offset + len(junk)] = junk
    f.write_bytes(bytes(data))


def _drop_index_key(root: Path, key: str) -> None:
    import json

    idx = json.loads((root / "index.json").read_text())
    del idx[key]
    (root / "index.json").write_text(json.dumps(idx))


def tb_events(tb_dir):
    """A run's TensorBoard events read back in full (scalars, histograms, tensors, images)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"histograms": 0, "tensors": 0, "images": 0, "scalars": 0})
    acc.Reload()
    return acc
