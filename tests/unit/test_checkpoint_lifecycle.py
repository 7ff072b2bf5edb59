"""Checkpoint lifecycle in one process: keep_last pruning, resuming from an explicit path, and
SIGUSR1 preemption (the 2-process SIGTERM and kill -9 cases are in tests/e2e/test_checkpoint.py)."""
import os
import signal

import torch

from megadmd.checkpoint import list_checkpoints
from megadmd.config import resolve
from megadmd.preemption import PreemptionFlag
from megadmd.runner import build_trainer, run_train
from megadmd.zero import full_state_dict


def _cfg(tmp_path, model_dir, data_dir, out="out", *extra):
    return resolve(overrides=[
        f"model.teacher_path={model_dir}", f"data.path={data_dir}", f"output_dir={tmp_path / out}",
        "train.micro_batch_size=2", "logging.tensorboard=false", "dmd.generator_update_interval=2",
        "validation.interval_steps=0", *extra])


def test_keep_last_prunes_old_checkpoints_and_resume_path_continues(tmp_path, test_model_dir, test_dataset_dir,
                                                                    single_process_world):
    t = run_train(_cfg(tmp_path, test_model_dir, test_dataset_dir, "out", "train.max_steps=8",
                       "checkpoint.interval_steps=2", "checkpoint.keep_last=2"))
    root = tmp_path / "out" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-00000008", "step-00000006"]
    assert (root / "latest").read_text().strip() == "step-00000008"
    saved = full_state_dict(t.models.generator.module)
    # an explicit path (not "auto") into another output folder: the state and weights come back
    r = build_trainer(_cfg(tmp_path, test_model_dir, test_dataset_dir, "other", "train.max_steps=10",
                           f"checkpoint.resume={root / 'step-00000006'}"))
    assert r.state.step == 6 and r.state.generator_updates == 3 and r.state.fake_score_updates == 6
    r2 = build_trainer(_cfg(tmp_path, test_model_dir, test_dataset_dir, "other2", "train.max_steps=10",
                            f"checkpoint.resume={root / 'step-00000008'}"))
    got = full_state_dict(r2.models.generator.module)
    assert all(torch.equal(saved[k], got[k]) for k in saved)


def test_sigusr1_stops_after_the_current_iteration(tmp_path, test_model_dir, test_dataset_dir, single_process_world):
    t = build_trainer(_cfg(tmp_path, test_model_dir, test_dataset_dir, "out", "train.max_steps=10",
                           "checkpoint.interval_steps=0"))
    t.preemption = PreemptionFlag().install()
    try:
        t.hooks.insert(0, lambda tr: os.kill(os.getpid(), signal.SIGUSR1) if tr.state.step == 3 else None)
        t.train()
    finally:
        t.preemption.uninstall()
    assert t.preempted and t.state.step == 3
