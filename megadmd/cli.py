"""The ``megadmd`` command line. Each command parses its options and calls one library function."""
from __future__ import annotations

import functools
import os
import sys

import click

from .config import ConfigError

GPU_NAMES = ("a100", "a100-40gb", "h100", "h200", "b200")  # megadmd.plan.compute.GPUS (not imported: CLI start-up)


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


def overwrite_option(fn):
    """``--overwrite``, shared by every command that writes a folder (megadmd/safety/folders.py)."""
    return click.option("--overwrite", is_flag=True,
                        help="replace a non-empty output folder (never a megadmd run, checkpoint, or a dataset "
                             "written by another command)")(fn)


def config_options(fn):
    """``--config``, ``--set``, ``--preset``, shared by commands that read a run config (train, plan)."""
    fn = click.option("--preset", default=None, help="same as --set preset=NAME (e.g. tiny, wan2.1-t2v-1.3b)")(fn)
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="override one config key, e.g. --set dmd.guidance_scale=3.0 (repeatable)")(fn)
    fn = click.option("--config", "-c", "config_file", default=None, type=click.Path(dir_okay=False),
                      help="YAML or JSON config file")(fn)
    return fn


def run_options(fn):
    """The shortcuts of a training run: its folder, length, resume, and the launcher's rank."""
    fn = click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True,
                      help="set by the deepspeed launcher")(fn)
    fn = click.option("--allow-config-change", is_flag=True,
                      help="same as --set checkpoint.allow_config_change=true: resume although keys that "
                           "change the optimisation differ from the checkpoint's config")(fn)
    fn = click.option("--resume", default=None, metavar="auto|PATH",
                      help="same as --set checkpoint.resume=...: 'auto' = newest intact checkpoint "
                           "(a fresh start when the folder has none)")(fn)
    fn = click.option("--max-steps", type=int, default=None, help="same as --set train.max_steps=N")(fn)
    fn = click.option("--output-dir", "-o", default=None, help="same as --set output_dir=DIR")(fn)
    return fn


def _resolve(config_file, overrides, preset, output_dir=None, max_steps=None, resume=None, allow_config_change=False):
    from .config import resolve

    extra = list(overrides)
    if resume is not None:
        extra.append(f"checkpoint.resume={resume}")
    if allow_config_change:
        extra.append("checkpoint.allow_config_change=true")
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
    from .monitoring.console import setup_console

    setup_console()  # every command, on every rank: log lines, known third-party warnings filtered


@main.command()
@config_options
@run_options
@click.option("--overwrite", is_flag=True,
              help="start a run in a non-empty folder that is not a megadmd run (nothing in it is deleted)")
@user_errors
def train(config_file, overrides, preset, output_dir, max_steps, local_rank, resume, allow_config_change,
          overwrite):
    """Distill a teacher into a few-step generator with DMD2.

    With no arguments it distills the built-in toy teacher (preset 'tiny') on this machine. One run
    per output folder: a folder with checkpoints is continued with --resume auto, never restarted.
    """
    from .dmd.guard import NonFiniteError
    from .runner import run_train

    cfg = _resolve(config_file, overrides, preset, output_dir, max_steps, resume, allow_config_change)
    try:
        run_train(cfg, local_rank=local_rank, overwrite=overwrite)
    except NonFiniteError:
        shutdown_distributed()  # every rank stops at the same, world-agreed point: leave together
        raise
    shutdown_distributed()


@main.command("make-dataset")
@click.option("--out", "-o", required=True, type=click.Path(), help="dataset folder to write")
@click.option("--num-samples", "-n", type=int, default=64, show_default=True)
@click.option("--latent-shape", default="16,4,8,8", show_default=True, help="C,F,H,W")
@click.option("--text-len", type=int, default=16, show_default=True, help="tokens per text embedding")
@click.option("--text-dim", type=int, default=4096, show_default=True)
@click.option("--text-only", is_flag=True, help="no latents (for data-free training)")
@click.option("--seed", type=int, default=0, show_default=True)
@overwrite_option
@user_errors
def make_dataset(out, num_samples, latent_shape, text_len, text_dim, text_only, seed, overwrite):
    """Write a random synthetic-latent dataset of any shape (for tests and demos)."""
    from .data.make import write_random_dataset

    shape = _int_list(latent_shape, "--latent-shape", 4)
    info = write_random_dataset(out, num_samples=num_samples, latent_shape=None if text_only else shape,
                                text_len=text_len, text_dim=text_dim, seed=seed, overwrite=overwrite)
    click.echo(f"wrote {info.num_samples} samples to {out}")


@main.command("encode-text")
@click.option("--prompts", required=True, type=click.Path(dir_okay=False), help="prompts file: .txt (one per line) or .jsonl")
@click.option("--out", "-o", required=True, type=click.Path(), help="text-only dataset folder to write")
@click.option("--text-encoder", required=True, type=click.Path(), help="UMT5EncoderModel folder, or a Wan pipeline folder")
@click.option("--tokenizer", default=None, type=click.Path(), help="tokenizer folder (default: with the encoder)")
@click.option("--negative-prompt", default=None,
              help="the unconditional prompt for the teacher's CFG [default: Wan's standard negative prompt; "
                   "--negative-prompt \"\" for none]")
@click.option("--max-len", type=int, default=512, show_default=True)
@click.option("--shard-size", type=int, default=256, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@overwrite_option
@user_errors
def encode_text(prompts, out, text_encoder, tokenizer, negative_prompt, max_len, shard_size, batch_size, precision,
                overwrite):
    """Encode prompts with UMT5 into a text-only dataset (data-free training, or input to synth).
    Resumable: rerun the same command to finish an interrupted one."""
    from .data.text import WAN_NEGATIVE_PROMPT, run_encode_text

    negative_prompt = WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
    info = run_encode_text(prompts, out, text_encoder, tokenizer, negative_prompt, max_len, shard_size,
                           batch_size, precision, overwrite)
    shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"encoded {info.num_samples} prompts into {out}")


@main.command()
@click.option("--teacher", required=True, type=click.Path(), help="diffusers Wan DiT folder or pipeline folder")
@click.option("--text-data", required=True, type=click.Path(file_okay=False), help="from megadmd encode-text")
@click.option("--out", "-o", required=True, type=click.Path(), help="synthetic-latent dataset to write")
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
@overwrite_option
@user_errors
def synth(teacher, text_data, out, latent_shape, video_size, steps, guidance_scale, cfg_form, flow_shift,
          seed, batch_size, precision, vae, num_decode, save_noise, overwrite):
    """Sample clean teacher latents for every prompt (resumable; split across ranks)."""
    from .data.synth import SynthOptions, run_synth

    shape = _latent_shape(latent_shape, video_size)
    info = run_synth(SynthOptions(
        teacher=teacher, text_data=text_data, out=out, latent_shape=tuple(shape), num_steps=steps,
        guidance_scale=guidance_scale, cfg_form=cfg_form, flow_shift=flow_shift, seed=seed,
        batch_size=batch_size, precision=precision, vae=vae, num_decode=num_decode if vae else 0,
        save_noise=save_noise, overwrite=overwrite))
    shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"synthesized {info.num_samples} latents of shape {shape} into {out}")


@main.command("encode-images")
@click.option("--text-data", required=True, type=click.Path(file_okay=False), help="from megadmd encode-text")
@click.option("--images", required=True, type=click.Path(dir_okay=False),
              help="one image path per prompt, in order (.txt lines or .jsonl {\"image\": ...})")
@click.option("--out", "-o", required=True, type=click.Path(), help="dataset to write")
@click.option("--image-encoder", required=True, type=click.Path(), help="CLIP vision model folder or Wan I2V pipeline")
@click.option("--vae", required=True, type=click.Path(), help="AutoencoderKLWan folder or Wan pipeline")
@click.option("--video-size", required=True, help="FRAMES,HEIGHT,WIDTH the conditions are made for")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@overwrite_option
@user_errors
def encode_images(text_data, images, out, image_encoder, vae, video_size, batch_size, precision, overwrite):
    """Add image-to-video conditions (first-frame latent, CLIP embedding) to a text dataset."""
    from .data.image import run_encode_images

    info = run_encode_images(text_data, images, out, image_encoder, vae, tuple(_int_list(video_size, "--video-size", 3)),
                             batch_size, precision, overwrite)
    shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"encoded {info.num_samples} image conditions into {out}")


def lora_option(fn):
    """``--lora adapter|merged`` of the export commands (LoRA runs only; docs/lora.md)."""
    return click.option("--lora", type=click.Choice(["adapter", "merged"]), default=None,
                        help="LoRA runs: the adapter alone, for WanPipeline.load_lora_weights, or the teacher "
                             "with it merged in  [default: merged]")(fn)


@main.group()
def convert() -> None:
    """Checkpoints to diffusers folders, universal checkpoints, and role initializations."""


@convert.command("to-diffusers")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(), help="folder to write")
@click.option("--role", type=click.Choice(["generator", "fake_score"]), default="generator", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--config", "model_config", default=None, type=click.Path(),
              help="model config.json, for a bare DeepSpeed checkpoint folder")
@click.option("--pipeline-from", default=None, type=click.Path(file_okay=False),
              help="a diffusers Wan pipeline folder: write a complete pipeline (its other components copied)")
@click.option("--link", is_flag=True,
              help="with --pipeline-from: relative symlinks to its components instead of copies")
@overwrite_option
@lora_option
@user_errors
def convert_to_diffusers(checkpoint, out, role, dtype, max_shard_size, model_config, pipeline_from, link, overwrite,
                         lora):
    """A megadmd (or DeepSpeed) checkpoint -> a diffusers WanTransformer3DModel folder."""
    from .convert import to_diffusers

    path = to_diffusers(checkpoint, out, role, dtype, max_shard_size, model_config, pipeline_from, link, overwrite,
                        lora)
    click.echo(f"wrote {path}")


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
@click.option("--out", "-o", required=True, type=click.Path(), help="folder to write")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@overwrite_option
@user_errors
def convert_init(weights, model_config, out, dtype, overwrite):
    """Plain safetensors weights (diffusers or original Wan names) -> a folder usable as any role's path."""
    from .convert import init_from_weights

    click.echo(f"wrote {init_from_weights(weights, model_config, out, dtype, overwrite=overwrite)}")


@convert.command("from-fastvideo-config")
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="megadmd run config (YAML) to write")
@click.option("--overwrite", is_flag=True, help="replace --out if it exists")
@user_errors
def convert_from_fastvideo_config(source, out, overwrite):
    """A FastVideo DMD2 launch script (legacy trainer flags) or training YAML -> a megadmd run config."""
    from .interop.fastvideo_config import convert_fastvideo_config, format_table

    result = convert_fastvideo_config(source, out, overwrite)
    click.echo(format_table(result.rows))
    click.echo(f"wrote {out} (CFG: {result.out['dmd']['cfg_form']} form, scale {result.out['dmd']['guidance_scale']:g})")


@convert.command("from-fastvideo-data")
@click.argument("source", type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="megadmd dataset folder to write")
@click.option("--negative", required=True, type=click.Path(),
              help="negative.safetensors (or a folder with one) from megadmd encode-text: FastVideo's data has none")
@click.option("--vae", default="", type=click.Path(), help="VAE (or pipeline) folder whose latents_mean/std normalize the latents")
@click.option("--preset", default="", help="or the Wan preset whose VAE constants to use (e.g. wan2.1-t2v-1.3b)")
@click.option("--shard-size", type=int, default=256, show_default=True)
@overwrite_option
@user_errors
def convert_from_fastvideo_data(source, out, negative, vae, preset, shard_size, overwrite):
    """A FastVideo parquet dataset -> megadmd's format (resumable; split across ranks). Training reads
    FastVideo data in place too; converting pays off when its row groups are large."""
    from .interop.fastvideo_data import convert_dataset

    info = convert_dataset(source, out, negative_path=negative, vae_path=vae, preset=preset, shard_size=shard_size,
                           overwrite=overwrite)
    shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"converted {info.num_samples} samples into {out}")


@main.command("export-ema")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(), help="folder to write")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--pipeline-from", default=None, type=click.Path(file_okay=False),
              help="a diffusers Wan pipeline folder: write a complete pipeline (its other components copied)")
@click.option("--link", is_flag=True,
              help="with --pipeline-from: relative symlinks to its components instead of copies")
@overwrite_option
@lora_option
@user_errors
def export_ema_cmd(checkpoint, out, dtype, max_shard_size, pipeline_from, link, overwrite, lora):
    """The generator's EMA weights of a checkpoint -> a diffusers folder that samples on the run's
    own DMD steps (scheduler and megadmd_sampling.json)."""
    from .convert import export_ema

    path = export_ema(checkpoint, out, dtype, max_shard_size, pipeline_from, link, overwrite, lora)
    click.echo(f"wrote {path}")


@main.command()
@click.option("--model", required=True, type=click.Path(),
              help="the distilled generator: an export (pipeline folder) or a transformer folder")
@click.option("--out", "-o", required=True, type=click.Path(), help="folder to write")
@click.option("--prompts", default=None, type=click.Path(dir_okay=False), help=".txt or .jsonl prompts")
@click.option("--text-encoder", default=None, type=click.Path(),
              help="UMT5 folder or Wan pipeline folder [default: the --model pipeline's own]")
@click.option("--tokenizer", default=None, type=click.Path())
@click.option("--embeds", default=None, type=click.Path(file_okay=False), help="a megadmd dataset's embeddings")
@click.option("--latent-shape", default=None, help="C,F,H,W")
@click.option("--video-size", default=None, help="FRAMES,HEIGHT,WIDTH (Wan VAE factors)")
@click.option("--steps", default=None,
              help="the DMD timesteps, e.g. 1000,757,522 [default: the model's megadmd_sampling.json, else those]")
@click.option("--attention", type=click.Choice(["dense", "vsa"]), default=None,
              help="the generator's self-attention [default: as the model trained, from megadmd_sampling.json]")
@click.option("--vsa-sparsity", type=float, default=None,
              help="VSA's fraction of skipped key cubes [default: the model's training value]; implies --attention vsa")
@click.option("--vsa-backend", type=click.Choice(["auto", "torch", "flex", "triton", "fastvideo"]), default="auto",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--noise", type=click.Choice(["megadmd", "diffusers"]), default="megadmd", show_default=True,
              help="sample j's noise as WanPipeline draws it with generator=torch.Generator().manual_seed(SEED+j) "
                   "after use_dmd_scheduler (megadmd), or after torch.manual_seed(SEED+j) with the export's "
                   "stock scheduler (diffusers)")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@click.option("--vae", default=None, type=click.Path(), help="decode to mp4 and a png grid")
@click.option("--compare-teacher", default=None, type=click.Path(), help="also time this teacher")
@click.option("--teacher-steps", type=int, default=50, show_default=True)
@click.option("--guidance-scale", type=float, default=5.0, show_default=True)
@click.option("--cfg-form", type=click.Choice(["standard", "offset"]), default="standard", show_default=True)
@click.option("--flow-shift", type=float, default=3.0, show_default=True)
@click.option("--negative-prompt", default=None,
              help="the teacher's unconditional prompt (with --prompts) [default: Wan's standard negative prompt]")
@click.option("--images", default=None, type=click.Path(dir_okay=False), help="image-to-video: one image per prompt")
@click.option("--image-encoder", default=None, type=click.Path(), help="CLIP vision model folder (with --images)")
@overwrite_option
@user_errors
def generate(model, out, prompts, text_encoder, tokenizer, embeds, latent_shape, video_size, steps, attention,
             vsa_sparsity, vsa_backend, seed, noise, batch_size, precision, vae, compare_teacher, teacher_steps,
             guidance_scale, cfg_form, flow_shift, negative_prompt, images, image_encoder, overwrite):
    """Few-step sampling with a distilled generator; optionally timed against the teacher.

    Sample j of --seed S equals diffusers' WanPipeline on the export called for prompt j with
    --seed S + j, as --noise says (README: Using the distilled model in diffusers)."""
    from .data.text import WAN_NEGATIVE_PROMPT
    from .generate import GenerateOptions, run_generate

    res = run_generate(GenerateOptions(
        model=model, out=out, latent_shape=tuple(_latent_shape(latent_shape, video_size)), prompts=prompts,
        text_encoder=text_encoder, tokenizer=tokenizer, embeds=embeds,
        negative_prompt=WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt,
        steps=_float_list(steps, "--steps") if steps else None, attention=attention, vsa_sparsity=vsa_sparsity,
        vsa_backend=vsa_backend, seed=seed, noise=noise, batch_size=batch_size, precision=precision,
        vae=vae, compare_teacher=compare_teacher, teacher_steps=teacher_steps, guidance_scale=guidance_scale,
        cfg_form=cfg_form, flow_shift=flow_shift, images=images, image_encoder=image_encoder,
        video_size=tuple(_int_list(video_size, "--video-size", 3)) if video_size else None, overwrite=overwrite))
    attn = f"VSA at sparsity {res['vsa_sparsity']:g}" if res["attention"] == "vsa" else "dense"
    click.echo(f"student, {res['student_steps']} steps: {res['student_s_per_sample']:.4f} s/sample "
               f"(timesteps {', '.join(f'{t:g}' for t in res['steps'])}; {attn} attention)")
    if "teacher_s_per_sample" in res:
        click.echo(f"teacher, {res['teacher_steps']} steps + CFG: {res['teacher_s_per_sample']:.4f} s/sample")
        click.echo(f"speedup: {res['speedup']:.1f}x")
    click.echo(f"wrote {res['num_samples']} samples to {out}")


@main.command()
@config_options
@click.option("--video-size", default=None, metavar="FRAMES,HEIGHT,WIDTH",
              help="video size in pixels [default: data.latent_shape, else the preset's]")
@click.option("--nodes", type=int, default=1, show_default=True)
@click.option("--gpus-per-node", type=int, default=8, show_default=True)
@click.option("--sp", type=int, default=None, help="Ulysses sequence-parallel size [default: parallel.sp_size]")
@click.option("--micro-batch", type=int, default=None, help="samples per rank [default: train.micro_batch_size]")
@click.option("--offload", type=click.Choice(["none", "optimizer", "all"]), default=None,
              help="DeepSpeed CPU offload of the optimizer states, or of them and the parameters "
                   "[default: as the deepspeed.* templates say]")
@click.option("--activation-checkpointing/--no-activation-checkpointing", default=None,
              help="all trainable roles on or off [default: model.activation_checkpointing]")
@click.option("--vsa-sparsity", type=float, default=None,
              help="the generator's VSA sparsity; 0 = dense [default: attention.vsa_sparsity, with its ramp]")
@click.option("--ema/--no-ema", default=None, help="an fp32 EMA of the generator [default: ema.decay > 0]")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default=None,
              help="[default: model.precision; auto is bf16 on a GPU]")
@click.option("--gpu", type=click.Choice(sorted(GPU_NAMES)), default="h100", show_default=True,
              help="sets the defaults of --gpu-memory-gib, --peak-tflops and --utilisation")
@click.option("--gpu-memory-gib", type=float, default=None, help="[default: the --gpu's]")
@click.option("--peak-tflops", type=float, default=None, help="dense bf16 (or TF32) peak [default: the --gpu's]")
@click.option("--utilisation", "--mfu", "utilisation", type=float, default=None,
              help="share of the peak an iteration reaches [default: the --gpu's, calibrated on FastVideo's run]")
@click.option("--lora-rank", type=int, default=None,
              help="plan LoRA at this rank (model.lora's targets and roles); 0 = full weights "
                   "[default: model.lora.rank when model.lora.enabled, else 0]")
@user_errors
def plan(config_file, overrides, preset, **flags):
    """Memory per GPU and time of a run, on paper, from its config (-c, --set, --preset) and flags.

    Exit status 0: it fits; 3: it does not; 2: bad input.
    """
    from .plan import PlanFlags, format_run_plan, plan_run

    cfg = _resolve(config_file, overrides, preset)
    if flags["video_size"]:
        flags["video_size"] = tuple(_int_list(flags["video_size"], "--video-size", 3))
    result = plan_run(cfg, PlanFlags(**flags))
    click.echo(format_run_plan(result))
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


def _float_list(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated numbers, got '{text}'") from None


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
