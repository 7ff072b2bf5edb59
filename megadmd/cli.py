"""The ``megadmd`` command line. Each command parses its options and calls one library function."""
from __future__ import annotations

import functools
import os
import sys

import click

from .config import ConfigError


def _fail(message: str) -> None:
    """One clear line on stderr (from rank 0 only under a launcher), then exit status 2."""
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"megadmd: error: {message}", err=True)
    sys.exit(2)


def shutdown_distributed() -> None:
    """The last step of a command that ran collectives: every rank leaves together."""
    from .parallel.init import shutdown_distributed as shutdown

    shutdown()


def user_errors(fn):
    """Turn ConfigError (bad input) into one line and exit status 2; other errors propagate."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            _fail(str(exc))

    return wrapper


def config_options(fn):
    """``--config``, ``--set`` and the common shortcuts, shared by commands that take a run config."""
    fn = click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True,
                      help="set by the deepspeed launcher")(fn)
    fn = click.option("--resume", default=None, metavar="auto|PATH",
                      help="same as --set checkpoint.resume=...: 'auto' = newest intact checkpoint")(fn)
    fn = click.option("--max-steps", type=int, default=None, help="same as --set train.max_steps=N")(fn)
    fn = click.option("--output-dir", "-o", default=None, help="same as --set output_dir=DIR")(fn)
    fn = click.option("--preset", default=None, help="same as --set preset=NAME (e.g. tiny, wan2.1-t2v-1.3b)")(fn)
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="override one config key, e.g. --set dmd.guidance_scale=3.0 (repeatable)")(fn)
    fn = click.option("--config", "-c", "config_file", default=None, type=click.Path(dir_okay=False),
                      help="YAML or JSON config file")(fn)
    return fn


def _resolve(config_file, overrides, preset, output_dir, max_steps, resume=None):
    from .config import resolve

    extra = list(overrides)
    if resume is not None:
        extra.append(f"checkpoint.resume={resume}")
    if preset is not None:
        extra.insert(0, f"preset={preset}")
    if output_dir is not None:
        extra.append(f"output_dir={output_dir}")
    if max_steps is not None:
        extra.append(f"train.max_steps={max_steps}")
    return resolve(config_file, extra)


@click.group()
@click.version_option(package_name="megadmd")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True,
              help="set by 'deepspeed --module megadmd', which puts it before the command")
def main(local_rank) -> None:
    """megadmd: DMD2 distillation of Wan video DiTs on DeepSpeed ZeRO-3."""
    if local_rank is not None:
        os.environ["LOCAL_RANK"] = str(local_rank)


@main.command()
@config_options
@user_errors
def train(config_file, overrides, preset, output_dir, max_steps, local_rank, resume):
    """Distill a teacher into a few-step generator with DMD2.

    With no arguments it distills the built-in toy teacher (preset 'tiny') on this machine.
    """
    from .runner import run_train

    cfg = _resolve(config_file, overrides, preset, output_dir, max_steps, resume)
    run_train(cfg, local_rank=local_rank)
    shutdown_distributed()


@main.command("make-dataset")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="dataset folder to write")
@click.option("--num-samples", "-n", type=int, default=64, show_default=True)
@click.option("--latent-shape", default="16,4,8,8", show_default=True, help="C,F,H,W")
@click.option("--text-len", type=int, default=16, show_default=True, help="tokens per text embedding")
@click.option("--text-dim", type=int, default=4096, show_default=True)
@click.option("--text-only", is_flag=True, help="no latents (for data-free training)")
@click.option("--seed", type=int, default=0, show_default=True)
@user_errors
def make_dataset(out, num_samples, latent_shape, text_len, text_dim, text_only, seed):
    """Write a random synthetic-latent dataset of any shape (for tests and demos)."""
    from .data.make import write_random_dataset

    shape = _int_list(latent_shape, "--latent-shape", 4)
    info = write_random_dataset(out, num_samples=num_samples, latent_shape=None if text_only else shape,
                                text_len=text_len, text_dim=text_dim, seed=seed)
    click.echo(f"wrote {info.num_samples} samples to {out}")


@main.command("encode-text")
@click.option("--prompts", required=True, type=click.Path(dir_okay=False), help="prompts file: .txt (one per line) or .jsonl")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="text-only dataset folder to write")
@click.option("--text-encoder", required=True, type=click.Path(), help="UMT5EncoderModel folder, or a Wan pipeline folder")
@click.option("--tokenizer", default=None, type=click.Path(), help="tokenizer folder (default: with the encoder)")
@click.option("--negative-prompt", default="", help="the unconditional prompt for the teacher's CFG")
@click.option("--max-len", type=int, default=512, show_default=True)
@click.option("--shard-size", type=int, default=256, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@user_errors
def encode_text(prompts, out, text_encoder, tokenizer, negative_prompt, max_len, shard_size, batch_size, precision):
    """Encode prompts with UMT5 into a text-only dataset (data-free training, or input to synth)."""
    from .data.text import run_encode_text

    info = run_encode_text(prompts, out, text_encoder, tokenizer, negative_prompt, max_len, shard_size,
                           batch_size, precision)
    shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"encoded {info.num_samples} prompts into {out}")


@main.command()
@click.option("--teacher", required=True, type=click.Path(), help="diffusers Wan DiT folder or pipeline folder")
@click.option("--text-data", required=True, type=click.Path(file_okay=False), help="from megadmd encode-text")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="synthetic-latent dataset to write")
@click.option("--latent-shape", default=None, help="C,F,H,W of the latents to sample")
@click.option("--video-size", default=None, help="FRAMES,HEIGHT,WIDTH in pixels; latent = 16,(F-1)/4+1,H/8,W/8 (Wan VAE)")
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--guidance-scale", type=float, default=5.0, show_default=True)
@click.option("--cfg-form", type=click.Choice(["standard", "offset"]), default="standard", show_default=True)
@click.option("--flow-shift", type=float, default=3.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@click.option("--vae", default=None, type=click.Path(), help="AutoencoderKLWan folder: decode a few samples to mp4/png")
@click.option("--decode", "num_decode", type=int, default=4, show_default=True, help="samples to decode with --vae")
@click.option("--save-noise", is_flag=True,
              help="also store each latent's starting noise: (noise, latent) pairs for dmd.regression")
@user_errors
def synth(teacher, text_data, out, latent_shape, video_size, steps, guidance_scale, cfg_form, flow_shift,
          seed, batch_size, precision, vae, num_decode, save_noise):
    """Sample clean teacher latents for every prompt (resumable; split across ranks)."""
    from .data.synth import SynthOptions, run_synth

    shape = _latent_shape(latent_shape, video_size)
    info = run_synth(SynthOptions(
        teacher=teacher, text_data=text_data, out=out, latent_shape=tuple(shape), num_steps=steps,
        guidance_scale=guidance_scale, cfg_form=cfg_form, flow_shift=flow_shift, seed=seed,
        batch_size=batch_size, precision=precision, vae=vae, num_decode=num_decode if vae else 0,
        save_noise=save_noise))
    shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"synthesized {info.num_samples} latents of shape {shape} into {out}")


@main.command("encode-images")
@click.option("--text-data", required=True, type=click.Path(file_okay=False), help="from megadmd encode-text")
@click.option("--images", required=True, type=click.Path(dir_okay=False),
              help="one image path per prompt, in order (.txt lines or .jsonl {\"image\": ...})")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="dataset to write")
@click.option("--image-encoder", required=True, type=click.Path(), help="CLIP vision model folder or Wan I2V pipeline")
@click.option("--vae", required=True, type=click.Path(), help="AutoencoderKLWan folder or Wan pipeline")
@click.option("--video-size", required=True, help="FRAMES,HEIGHT,WIDTH the conditions are made for")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@user_errors
def encode_images(text_data, images, out, image_encoder, vae, video_size, batch_size, precision):
    """Add image-to-video conditions (first-frame latent, CLIP embedding) to a text dataset."""
    from .data.image import run_encode_images

    info = run_encode_images(text_data, images, out, image_encoder, vae, tuple(_int_list(video_size, "--video-size", 3)),
                             batch_size, precision)
    shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"encoded {info.num_samples} image conditions into {out}")


@main.group()
def convert() -> None:
    """Checkpoints to diffusers folders, universal checkpoints, and role initializations."""


@convert.command("to-diffusers")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False))
@click.option("--role", type=click.Choice(["generator", "fake_score"]), default="generator", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--config", "model_config", default=None, type=click.Path(),
              help="model config.json, for a bare DeepSpeed checkpoint folder")
@click.option("--pipeline-from", default=None, type=click.Path(file_okay=False),
              help="a diffusers Wan pipeline folder: write a complete pipeline (its other components linked)")
@user_errors
def convert_to_diffusers(checkpoint, out, role, dtype, max_shard_size, model_config, pipeline_from):
    """A megadmd (or DeepSpeed) checkpoint -> a diffusers WanTransformer3DModel folder."""
    from .convert import to_diffusers

    click.echo(f"wrote {to_diffusers(checkpoint, out, role, dtype, max_shard_size, model_config, pipeline_from)}")


@convert.command("to-universal")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@user_errors
def convert_to_universal(checkpoint):
    """Add DeepSpeed universal copies to a checkpoint (resuming at another world size does this itself)."""
    from .convert import to_universal

    for p in to_universal(checkpoint):
        click.echo(f"wrote {p}")


@convert.command("init")
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("--config", "model_config", required=True, help="config.json, a folder with one, or a preset name")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@user_errors
def convert_init(weights, model_config, out, dtype):
    """Plain safetensors weights (diffusers or original Wan names) -> a folder usable as any role's path."""
    from .convert import init_from_weights

    click.echo(f"wrote {init_from_weights(weights, model_config, out, dtype)}")


@main.command("export-ema")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--pipeline-from", default=None, type=click.Path(file_okay=False),
              help="a diffusers Wan pipeline folder: write a complete pipeline (its other components linked)")
@user_errors
def export_ema_cmd(checkpoint, out, dtype, max_shard_size, pipeline_from):
    """The generator's EMA weights of a checkpoint -> a diffusers folder."""
    from .convert import export_ema

    click.echo(f"wrote {export_ema(checkpoint, out, dtype, max_shard_size, pipeline_from)}")


@main.command()
@click.option("--model", required=True, type=click.Path(), help="the distilled generator (diffusers folder)")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False))
@click.option("--prompts", default=None, type=click.Path(dir_okay=False), help=".txt or .jsonl prompts")
@click.option("--text-encoder", default=None, type=click.Path(), help="UMT5 folder or Wan pipeline folder")
@click.option("--tokenizer", default=None, type=click.Path())
@click.option("--embeds", default=None, type=click.Path(file_okay=False), help="a megadmd dataset's embeddings")
@click.option("--latent-shape", default=None, help="C,F,H,W")
@click.option("--video-size", default=None, help="FRAMES,HEIGHT,WIDTH (Wan VAE factors)")
@click.option("--steps", default="1000,757,522", show_default=True, help="the DMD denoising steps")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@click.option("--vae", default=None, type=click.Path(), help="decode to mp4 and a png grid")
@click.option("--compare-teacher", default=None, type=click.Path(), help="also time this teacher")
@click.option("--teacher-steps", type=int, default=50, show_default=True)
@click.option("--guidance-scale", type=float, default=5.0, show_default=True)
@click.option("--cfg-form", type=click.Choice(["standard", "offset"]), default="standard", show_default=True)
@click.option("--flow-shift", type=float, default=3.0, show_default=True)
@click.option("--negative-prompt", default="", help="the teacher's unconditional prompt (with --prompts)")
@click.option("--images", default=None, type=click.Path(dir_okay=False), help="image-to-video: one image per prompt")
@click.option("--image-encoder", default=None, type=click.Path(), help="CLIP vision model folder (with --images)")
@user_errors
def generate(model, out, prompts, text_encoder, tokenizer, embeds, latent_shape, video_size, steps, seed,
             batch_size, precision, vae, compare_teacher, teacher_steps, guidance_scale, cfg_form, flow_shift,
             negative_prompt, images, image_encoder):
    """Few-step sampling with a distilled generator; optionally timed against the teacher."""
    from .generate import GenerateOptions, run_generate

    res = run_generate(GenerateOptions(
        model=model, out=out, latent_shape=tuple(_latent_shape(latent_shape, video_size)), prompts=prompts,
        text_encoder=text_encoder, tokenizer=tokenizer, embeds=embeds, negative_prompt=negative_prompt,
        steps=[float(x) for x in steps.split(",")], seed=seed, batch_size=batch_size, precision=precision,
        vae=vae, compare_teacher=compare_teacher, teacher_steps=teacher_steps, guidance_scale=guidance_scale,
        cfg_form=cfg_form, flow_shift=flow_shift, images=images, image_encoder=image_encoder,
        video_size=tuple(_int_list(video_size, "--video-size", 3)) if video_size else None))
    click.echo(f"student, {res['student_steps']} steps: {res['student_s_per_sample']:.4f} s/sample")
    if "teacher_s_per_sample" in res:
        click.echo(f"teacher, {res['teacher_steps']} steps + CFG: {res['teacher_s_per_sample']:.4f} s/sample")
        click.echo(f"speedup: {res['speedup']:.1f}x")
    click.echo(f"wrote {res['num_samples']} samples to {out}")


@main.command()
@click.option("--preset", required=True, help="model preset, e.g. wan2.1-t2v-1.3b or wan2.1-t2v-14b")
@click.option("--video-size", default=None, metavar="FRAMES,HEIGHT,WIDTH",
              help="video size in pixels [default: the preset's]")
@click.option("--nodes", type=int, default=1, show_default=True)
@click.option("--gpus-per-node", type=int, default=8, show_default=True)
@click.option("--sp", type=int, default=1, show_default=True, help="Ulysses sequence-parallel size")
@click.option("--micro-batch", type=int, default=1, show_default=True, help="samples per rank")
@click.option("--offload", type=click.Choice(["none", "optimizer", "all"]), default="none", show_default=True,
              help="DeepSpeed CPU offload of the optimizer states, or of them and the parameters")
@click.option("--no-activation-checkpointing", is_flag=True, help="plan without activation checkpointing")
@click.option("--vsa-sparsity", type=float, default=0.0, show_default=True,
              help="the generator's VSA sparsity; 0 = dense attention")
@click.option("--ema/--no-ema", default=False, show_default=True, help="keep an fp32 EMA of the generator")
@click.option("--gpu-memory-gib", type=float, default=80.0, show_default=True)
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@user_errors
def plan(preset, video_size, nodes, gpus_per_node, sp, micro_batch, offload, no_activation_checkpointing,
         vsa_sparsity, ema, gpu_memory_gib, precision):
    """Per-GPU memory of a run, on paper. Exit status 0: it fits; 3: it does not; 2: bad input."""
    from .plan import format_plan, plan_memory

    size = tuple(_int_list(video_size, "--video-size", 3)) if video_size else None
    result = plan_memory(preset, video_size=size, nodes=nodes, gpus_per_node=gpus_per_node, sp=sp,
                         micro_batch=micro_batch, offload=offload,
                         activation_checkpointing=not no_activation_checkpointing, vsa_sparsity=vsa_sparsity,
                         ema=ema, gpu_memory_gib=gpu_memory_gib, precision=precision)
    click.echo(format_plan(result))
    if not result.fits:
        sys.exit(3)


def _latent_shape(latent_shape, video_size) -> list[int]:
    """--latent-shape, or the latent of --video-size with Wan2.1's VAE (16 channels, 4x8x8)."""
    if latent_shape is None and video_size is None:
        raise ConfigError("give --latent-shape C,F,H,W or --video-size FRAMES,HEIGHT,WIDTH")
    if latent_shape is not None:
        return _int_list(latent_shape, "--latent-shape", 4)
    f, h, w = _int_list(video_size, "--video-size", 3)
    if (f - 1) % 4 or h % 8 or w % 8:
        raise ConfigError(f"--video-size {video_size}: frames must be 4k+1 and height/width multiples of 8")
    return [16, (f - 1) // 4 + 1, h // 8, w // 8]


def _int_list(text: str, name: str, n: int) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"{name} must be {n} comma-separated integers, got '{text}'") from None
    if len(vals) != n or min(vals) <= 0:
        raise ConfigError(f"{name} must be {n} comma-separated positive integers, got '{text}'")
    return vals


if __name__ == "__main__":  # pragma: no cover
    main()
