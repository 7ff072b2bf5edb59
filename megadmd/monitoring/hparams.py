"""The run's main hyperparameters and result metrics, as the tracking backends receive them.

The whole resolved config goes to TensorBoard's text tab and to the W&B config; the keys below
are the ones worth a column when runs are compared (TensorBoard's HParams table). Values are
numbers or strings: lists are written as JSON, booleans as true/false.
"""
from __future__ import annotations

import json

MAIN_HPARAMS = (
    "preset", "model.precision",
    "dmd.denoising_steps", "dmd.flow_shift", "dmd.guidance_scale", "dmd.cfg_form", "dmd.guidance_interval",
    "dmd.generator_update_interval", "dmd.grad_norm_mean", "dmd.simulate_generator_forward",
    "dmd.train_first_step", "dmd.gan.enabled",
    "optim.generator.lr", "optim.generator.betas", "optim.generator.scheduler",
    "optim.fake_score.lr", "optim.fake_score.betas", "optim.fake_score.scheduler",
    "train.max_steps", "train.micro_batch_size", "train.grad_accum_steps", "train.max_grad_norm", "train.seed",
    "parallel.sp_size", "ema.decay", "attention.vsa_sparsity",
)
LOSS_METRICS = ("loss/generator", "loss/fake_score")
TOY_QUALITY_METRICS = ("quality/precision", "quality/coverage", "quality/entropy", "quality/frechet")


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _plain(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return value


def main_hparams(config: dict, world_size: int, dp_size: int) -> dict:
    """``config`` is the resolved config as a dict (config.to_dict); the layout comes from the
    launcher, so it is passed in."""
    out = {k: _plain(_lookup(config, k)) for k in MAIN_HPARAMS}
    train = config["train"]
    out.update(world_size=world_size,
               global_batch=dp_size * train["micro_batch_size"] * train["grad_accum_steps"])
    return out


def result_metrics(toy_quality: bool) -> list:
    """Scalar tags whose final values are the run's results."""
    return list(LOSS_METRICS) + (list(TOY_QUALITY_METRICS) if toy_quality else [])
