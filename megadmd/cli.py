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
    fn = click.option("--max-steps", type=int, default=None, help="same as --set train.max_steps=N")(fn)
    fn = click.option("--output-dir", "-o", default=None, help="same as --set output_dir=DIR")(fn)
    fn = click.option("--preset", default=None, help="same as --set preset=NAME (e.g. tiny, wan2.1-t2v-1.3b)")(fn)
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="override one config key, e.g. --set dmd.guidance_scale=3.0 (repeatable)")(fn)
    fn = click.option("--config", "-c", "config_file", default=None, type=click.Path(dir_okay=False),
                      help="YAML or JSON config file")(fn)
    return fn


def _resolve(config_file, overrides, preset, output_dir, max_steps):
    from .config import resolve

    extra = list(overrides)
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
def train(config_file, overrides, preset, output_dir, max_steps, local_rank):
    """Distill a teacher into a few-step generator with DMD2.

    With no arguments it distills the built-in toy teacher (preset 'tiny') on this machine.
    """
    from .runner import run_train

    cfg = _resolve(config_file, overrides, preset, output_dir, max_steps)
    run_train(cfg, local_rank=local_rank)


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
