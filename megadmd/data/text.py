"""``megadmd encode-text``: prompts -> a text-only dataset of UMT5 embeddings.

The output is a dataset in the usual format (data/format.py) without latents: what data-free
training reads, and what ``megadmd synth`` turns into a synthetic-latent dataset.

As in Wan's pipelines, each prompt is tokenized to at most ``max_len`` (512) tokens, encoded by
transformers' ``UMT5EncoderModel``, and stored trimmed to its valid length (its mask); training
zero-pads it back. The negative prompt is encoded the same way and stored as the dataset's
unconditional input (its text also goes to ``index.json``, under ``extra.negative_prompt``). It
defaults to Wan's standard English negative prompt, the one FastVideo's Wan presets and
diffusers' Wan examples use, so the teacher's guided target matches theirs; ``""`` is allowed.

Work is split across ranks by shard (shard k goes to rank k % world), every shard is written
atomically, and shards that exist are skipped, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..io_utils import read_text_utf8
from ..monitoring.progress import progress
from ..safety.folders import begin_output, check_output, content_sha256
from .format import DatasetInfo, existing_shard, write_index, write_negative, write_shard

log = logging.getLogger("megadmd")

# Wan2.1's standard negative prompt (English), as in diffusers' Wan pipeline examples and
# FastVideo's Wan presets.
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, "
    "still picture, messy background, three legs, many people in the background, walking backwards"
)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (.txt) or per JSON object with a prompt/caption/text key (.jsonl)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompts file not found: {p}")
    prompts = []
    for n, line in enumerate(read_text_utf8(p, "prompts file").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix.lower() == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{p}:{n} is not valid JSON: {exc}") from exc
            text = next((obj[k] for k in ("prompt", "caption", "text") if k in obj), None)
            if not isinstance(text, str):
                raise ConfigError(f"{p}:{n} has no string 'prompt', 'caption' or 'text' field")
            prompts.append(text)
        else:
            prompts.append(line)
    prompts = [clean_prompt(x) for x in prompts]
    if not prompts:
        raise ConfigError(f"prompts file {p} holds no prompts")
    return prompts


def clean_prompt(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _find(folder: Path, sub: str, marker: tuple[str, ...]) -> Optional[Path]:
    for cand in (folder, folder / sub):
        if any((cand / m).is_file() for m in marker):
            return cand
    return None


def load_text_encoder(encoder_path: str | Path, tokenizer_path: Optional[str | Path], device, dtype):
    """A tokenizer and ``UMT5EncoderModel`` from local folders (a Wan pipeline folder works too:
    its ``text_encoder/`` and ``tokenizer/`` subfolders are used)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    root = Path(encoder_path).expanduser()
    if not root.exists():
        raise ConfigError(f"text encoder folder not found: {root}")
    enc_dir = _find(root, "text_encoder", ("config.json",))
    if enc_dir is None:
        raise ConfigError(f"no text encoder config.json in {root} (nor in {root}/text_encoder)")
    tok_root = Path(tokenizer_path).expanduser() if tokenizer_path else root
    tok_dir = _find(tok_root, "tokenizer", ("tokenizer.json", "spiece.model", "tokenizer_config.json"))
    if tok_dir is None:
        raise ConfigError(f"no tokenizer found in {tok_root} (nor in {tok_root}/tokenizer); "
                          f"pass --tokenizer with a folder holding tokenizer.json or spiece.model")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    encoder = UMT5EncoderModel.from_pretrained(str(enc_dir), torch_dtype=dtype).to(device).eval()
    return tokenizer, encoder


@torch.no_grad()
def encode_prompts(tokenizer, encoder, prompts: list[str], max_len: int, device) -> list[torch.Tensor]:
    """Each prompt's embedding ``[L_i, D]`` in float32, trimmed to its valid length."""
    tok = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    hidden = encoder(ids, attention_mask=mask).last_hidden_state.float().cpu()
    lens = mask.sum(dim=1).clamp(min=1).tolist()
    return [hidden[i, : int(n)] for i, n in enumerate(lens)]


def run_encode_text(prompts_file: str, out: str, text_encoder: str, tokenizer: Optional[str] = None,
                    negative_prompt: str = WAN_NEGATIVE_PROMPT, max_len: int = 512, shard_size: int = 256,
                    batch_size: int = 16, precision: str = "auto", overwrite: bool = False) -> DatasetInfo:
    """Encode every prompt into a text-only dataset at ``out``. Collective when launched on
    several ranks; resumable (an output of this command with the same settings is continued)."""
    from ..parallel.init import init_distributed
    from ..runner import compute_dtype

    prompts = read_prompts(prompts_file)  # bad input fails before anything starts
    if shard_size <= 0 or batch_size <= 0 or max_len <= 0:
        raise ConfigError("--shard-size, --batch-size and --max-len must be positive")
    settings = {"prompts": str(Path(prompts_file).resolve()), "prompts_sha256": content_sha256(prompts_file),
                "text_encoder": str(Path(text_encoder).resolve()),
                "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None,
                "negative_prompt": negative_prompt, "max_len": max_len, "shard_size": shard_size,
                "precision": precision}
    target = check_output(out, "encode-text", overwrite, inputs=[prompts_file, text_encoder, tokenizer],
                          settings=settings)
    proc = init_distributed()
    tokenizer_obj, encoder = load_text_encoder(text_encoder, tokenizer, proc.device,
                                               compute_dtype(precision, proc.device))
    root = Path(out)
    if proc.rank == 0:
        begin_output(target, "encode-text", settings)
    dist.barrier()
    dim = encoder.config.d_model
    num_shards = (len(prompts) + shard_size - 1) // shard_size
    # shards written by an earlier, interrupted run are kept
    mine = [k for k in range(proc.rank, num_shards, proc.world_size) if existing_shard(root, k) is None]
    todo = sum(len(prompts[k * shard_size:(k + 1) * shard_size]) for k in mine)
    with progress(todo, "encode-text", unit="prompts", rank=proc.rank, world_size=proc.world_size) as bar:
        for k in mine:
            chunk = prompts[k * shard_size:(k + 1) * shard_size]
            embeds = []
            for i in range(0, len(chunk), batch_size):
                embeds += encode_prompts(tokenizer_obj, encoder, chunk[i:i + batch_size], max_len, proc.device)
                bar.update(len(chunk[i:i + batch_size]))
            write_shard(root, k, text_embeds=embeds, captions=chunk, first_index=k * shard_size,
                        max_text_len=max_len, text_dim=dim)
            log.info("encode-text: shard %d/%d written", k + 1, num_shards)
    dist.barrier()
    info = DatasetInfo(num_samples=len(prompts), text_dim=dim, max_text_len=max_len, shard_size=shard_size,
                       shards=[existing_shard(root, k) for k in range(num_shards)],
                       extra={"text_encoder": str(text_encoder), "source": str(prompts_file),
                              "negative_prompt": clean_prompt(negative_prompt), "written_by": "encode-text"})
    if proc.rank == 0:
        neg = encode_prompts(tokenizer_obj, encoder, [clean_prompt(negative_prompt)], max_len, proc.device)[0]
        write_negative(root, neg, negative_prompt)
        write_index(root, info)
    dist.barrier()
    return info
