"""The console: known third-party warnings filtered one by one, progress as a bar on a terminal
and as plain lines elsewhere, log lines from rank 0 only."""
import io
import logging
import warnings

import pytest

from megadmd.monitoring import console
from megadmd.monitoring.progress import Progress, progress

SCATTER = ("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
           "`torch.distributed.reduce_scatter_single` instead.")


def _shown(message, category, module):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_known_warnings()
        warnings.warn_explicit(message, category, "c10d_logger.py", 83, module=module)
    return len(caught)


def test_known_warnings_are_filtered_by_exact_message_category_and_module():
    assert _shown(SCATTER, FutureWarning, "torch.distributed.c10d_logger") == 0
    # the same text from another module, another category, or another message still shows
    assert _shown(SCATTER, FutureWarning, "megadmd.zero") == 1
    assert _shown(SCATTER, UserWarning, "torch.distributed.c10d_logger") == 1
    assert _shown("`torch.distributed.broadcast` is deprecated.", FutureWarning, "torch.distributed.c10d_logger") == 1


def test_deepspeeds_cpu_accelerator_notice_is_dropped_and_its_other_warnings_kept():
    console.quiet_known_warnings()
    console.quiet_known_warnings()  # idempotent: one filter
    ds = logging.getLogger("DeepSpeed")
    assert sum(isinstance(f, console._DropMessage) for f in ds.filters) == 1
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    ds.addHandler(handler)
    try:
        ds.warning(console.KNOWN_LOG_RECORDS[0][1])
        ds.warning("Setting accelerator to CPU. Something else.")
    finally:
        ds.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["Setting accelerator to CPU. Something else."]


def test_log_lines_from_rank_0_on_stdout_other_ranks_warnings_on_stderr(capsys):
    log = logging.getLogger("megadmd")
    console.setup_logging(0)
    log.info("hello from rank 0")
    console.setup_logging(1)
    log.info("not shown")
    log.warning("a warning from rank 1")
    out, err = capsys.readouterr()
    assert "hello from rank 0" in out and "not shown" not in out + err
    assert "a warning from rank 1" in err
    console.setup_logging(0)


def test_progress_on_a_terminal_is_a_tqdm_bar(capsys):
    with Progress(3, "synth", unit="samples", tty=True) as bar:
        for _ in range(3):
            bar.update(1)
    err = capsys.readouterr().err
    assert "\r" in err and "synth: 100%" in err and "3/3" in err and "samples" in err


def test_progress_in_a_log_is_plain_lines_first_periodic_and_last(capsys, monkeypatch):
    console.setup_logging(0)
    monkeypatch.setenv("MEGADMD_PROGRESS_INTERVAL_S", "3600")
    with Progress(5, "encode-text", unit="prompts", tty=False) as bar:
        for _ in range(5):
            bar.update(1)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "encode-text:" in ln]
    assert len(lines) == 2  # the first step and the end; the 1-hour interval hides the rest
    assert "1/5 prompts (20%)" in lines[0] and "eta" in lines[0]
    assert "5/5 prompts (100%)" in lines[1] and "eta" not in lines[1]
    monkeypatch.setenv("MEGADMD_PROGRESS_INTERVAL_S", "0")
    with Progress(4, "convert", tty=False) as bar:
        for _ in range(4):
            bar.update(1)
    assert sum("convert:" in ln for ln in capsys.readouterr().out.splitlines()) == 4


def test_only_rank_0_reports_and_a_shared_count_says_so(capsys, monkeypatch):
    console.setup_logging(0)
    monkeypatch.setenv("RANK", "1")
    with progress(2, "synth", tty=True) as bar:
        bar.update(2)
    with progress(2, "synth", tty=False) as bar:
        bar.update(2)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    monkeypatch.setenv("RANK", "0")
    with progress(2, "synth", unit="samples", tty=False, world_size=8) as bar:
        bar.update(2)
    assert "synth (rank 0 of 8): 2/2 samples" in capsys.readouterr().out


@pytest.mark.parametrize("ci", ["true", ""])
def test_ci_means_plain_lines_even_on_a_terminal(monkeypatch, ci):
    from megadmd.monitoring import progress as progress_module

    monkeypatch.setattr(progress_module.sys, "stderr", type("Tty", (io.StringIO,), {"isatty": lambda self: True})())
    monkeypatch.setenv("CI", ci)
    assert progress_module.on_terminal() is (ci == "")


def test_logging_backends_config_and_the_missing_wandb_error(monkeypatch):
    from megadmd.config import ConfigError, resolve
    from megadmd.preflight import check_logging_backends

    assert resolve().logging.active_backends == ["tensorboard"]
    both = resolve(overrides=["logging.backends=tensorboard,wandb", "logging.tensorboard=false"])
    assert both.logging.active_backends == ["wandb"]  # the older switch still drops TensorBoard
    with pytest.raises(ConfigError, match="logging.backends entries must be one of tensorboard, wandb; got 'mlflow'"):
        resolve(overrides=["logging.backends=tensorboard,mlflow"])
    with pytest.raises(ConfigError, match="lists a backend twice"):
        resolve(overrides=["logging.backends=wandb,wandb"])
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"wandb package is not installed; pip install 'megadmd\[wandb\]'"):
        check_logging_backends(["tensorboard", "wandb"])
    check_logging_backends(["tensorboard"])


@pytest.mark.parametrize("rank, tty, quiet", [(0, True, False), (0, False, True), (1, True, True)])
def test_other_libraries_progress_bars_stay_out_of_logs(monkeypatch, rank, tty, quiet):
    from megadmd.monitoring import progress as progress_module

    for key in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "CI"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setattr(progress_module, "on_terminal", lambda: tty)
    console.quiet_other_progress_bars(rank)
    import os

    assert (os.environ.get("TQDM_DISABLE"), os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")) == (
        ("1", "1") if quiet else (None, None))
