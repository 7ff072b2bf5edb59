"""Tracking backends: TensorBoard (always available) and Weights & Biases (optional extra).

Both receive the same calls from ``metrics.MetricsWriter`` on rank 0: scalars, images (with a
caption), text, histograms, and once per run the resolved config with its main hyperparameters.

TensorBoard: events in ``<output_dir>/tensorboard``. The config is a text entry (``config``); the
hyperparameters go through the hparams plugin, written into the run's own event file with
``torch.utils.tensorboard.summary.hparams`` (``SummaryWriter.add_hparams`` would open a second
run folder for them). Their metrics are scalar tags of the run itself (``loss/generator``,
``quality/precision``, ...), so the HParams table shows each run's latest, i.e. final, values.

Weights & Biases: ``wandb.init`` with the resolved config, files under ``<output_dir>/wandb``
(or ``WANDB_DIR``); ``WANDB_MODE=offline`` works without a network. The run id is kept in
``<output_dir>/wandb_run_id`` so that a resumed run continues the same W&B run.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Optional

import torch

BACKENDS = ("tensorboard", "wandb")
WANDB_ID_FILE = "wandb_run_id"


def config_markdown(config: dict) -> str:
    """The config as a Markdown code block (TensorBoard's text tab renders Markdown)."""
    return "\n".join("    " + line for line in json.dumps(config, indent=2).splitlines())


class TensorBoardBackend:
    """Events in ``<output_dir>/tensorboard``. The event file is created with the first value, so a
    run refused at start-up (a damaged checkpoint, a changed config) leaves no trace."""

    def __init__(self, output_dir: str | Path):
        self._log_dir = Path(output_dir) / "tensorboard"
        self._writer = None

    @property
    def _tb(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self._log_dir))
        return self._writer

    def scalars(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self._tb.add_scalar(k, v, global_step=step)

    def image(self, tag: str, image_chw: torch.Tensor, step: int, caption: Optional[str]) -> None:
        self._tb.add_image(tag, image_chw, global_step=step, dataformats="CHW")
        if caption:
            self._tb.add_text(f"{tag}/caption", caption, global_step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self._tb.add_text(tag, text, global_step=step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self._tb.add_histogram(tag, values.detach().float().cpu(), global_step=step)

    def run_info(self, config: dict, hparams: dict, metric_tags: list, step: int) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        self._tb.add_text("config", config_markdown(config), global_step=step)
        experiment, session_start, _ = hparams_summary(hparams, {tag: 0.0 for tag in metric_tags})
        writer = self._tb._get_file_writer()
        writer.add_summary(experiment, global_step=step)
        writer.add_summary(session_start, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbBackend:
    def __init__(self, output_dir: str | Path, project: str, entity: str = "", run_name: str = "",
                 resuming: bool = False):
        import wandb

        self._wandb = wandb
        out = Path(output_dir)
        id_file = out / WANDB_ID_FILE
        kwargs = dict(project=project, entity=entity or None, name=run_name or out.resolve().name)
        if not os.environ.get("WANDB_DIR"):
            (out / "wandb").mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(out)
        if resuming and id_file.is_file():
            kwargs.update(id=id_file.read_text().strip(), resume="allow")
        self._run = wandb.init(**kwargs)
        from ..io_utils import atomic_write_text

        atomic_write_text(id_file, self._run.id + "\n")

    def scalars(self, values: dict, step: int) -> None:
        self._run.log(dict(values), step=step)

    def image(self, tag: str, image_chw: torch.Tensor, step: int, caption: Optional[str]) -> None:
        hwc = (image_chw.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        self._run.log({tag: self._wandb.Image(hwc, caption=caption)}, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self._run.log({tag: self._wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self._run.log({tag: self._wandb.Histogram(values.detach().float().cpu().numpy())}, step=step)

    def run_info(self, config: dict, hparams: dict, metric_tags: list, step: int) -> None:
        # W&B's run table compares runs by their config; the metrics' last values are its summary.
        self._run.config.update(config, allow_val_change=True)

    def flush(self) -> None:
        pass  # wandb's service writes in the background

    def close(self) -> None:
        self._run.finish()
