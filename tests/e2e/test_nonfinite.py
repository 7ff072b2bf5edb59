"""Training on data with NaN samples: skipped and counted (skip), halted with one line and no
checkpoint after the bad step (stop), stopped when nothing can be learnt (an all-NaN dataset);
a NaN the DMD direction's nan_to_num would hide, and DeepSpeed's own overflow skip, are caught."""
import contextlib
import io
import json

import pytest
import torch
from click.testing import CliRunner

from megadmd.cli import main
from megadmd.config import resolve
from megadmd.data.format import LatentDataset
from megadmd.data.loader import BatchSource
from megadmd.dmd import losses
from megadmd.dmd.guard import NonFiniteError
from megadmd.parallel.init import init_distributed
from megadmd.runner import build_trainer, run_train
from megadmd.zero import full_state_dict
from tests.helpers import save_poisoned_dataset, save_test_dataset, save_test_model

NAN = float("nan")
MICRO_BATCH = 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    model = save_test_model(root / "wan")
    clean = save_test_dataset(root / "clean", num_samples=8)
    # the sample that iteration 2 (global micro-step 1) draws first, so iteration 1 is clean
    stream = BatchSource(LatentDataset(clean), micro_batch=MICRO_BATCH, dp_rank=0, dp_size=1,
                         seed=resolve().train.seed)
    second = stream._index_at(stream.positions_for(1)[0])
    one_nan = save_poisoned_dataset(root / "one-nan", clean, {second: ("latents", NAN)})
    all_nan = save_poisoned_dataset(root / "all-nan", clean, {i: ("latents", NAN) for i in range(8)})
    return {"model": model, "one_nan": one_nan, "all_nan": all_nan}


def _overrides(files, data, out, *extra):
    return [f"model.teacher_path={files['model']}", f"data.path={data}", f"output_dir={out}",
            f"train.micro_batch_size={MICRO_BATCH}", "train.max_steps=4", "dmd.generator_update_interval=2",
            "logging.interval_steps=2", "checkpoint.interval_steps=0", *extra]


def _scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _finite(module) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in full_state_dict(module).values())


@pytest.fixture(scope="module")
def skip_run(files, tmp_path_factory, single_process_world):
    out = tmp_path_factory.mktemp("skip") / "run"
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # rank 0's log handler writes to the stdout of its set-up
        trainer = run_train(resolve(overrides=_overrides(files, files["one_nan"], out)))
    return trainer, out, log.getvalue()


def test_skip_drops_the_bad_iterations_updates_and_counts_them(skip_run):
    trainer, out, _ = skip_run
    s = trainer.state
    # iteration 2 holds the NaN sample: its generator and fake-score updates are not applied
    assert (s.step, s.generator_updates, s.generator_skipped) == (4, 1, 1)
    assert (s.fake_score_updates, s.fake_score_skipped) == (3, 1)
    assert trainer.models.generator.skipped_steps == 1 and trainer.models.fake_score.skipped_steps == 1
    assert _finite(trainer.models.generator.module) and _finite(trainer.models.fake_score.module)
    assert _scalars(out, "health/skipped_steps") == [(2, 2.0), (4, 2.0)]
    assert _scalars(out, "health/skipped_steps/generator") == [(2, 1.0), (4, 1.0)]
    # the logged losses are those of applied updates: never NaN
    assert all(v == v for _, v in _scalars(out, "loss/fake_score") + _scalars(out, "loss/generator"))
    saved = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert (saved["generator_updates"], saved["generator_skipped"], saved["fake_score_skipped"]) == (1, 1, 1)


def test_the_log_says_what_was_skipped(skip_run):
    _, _, log = skip_run
    assert "iteration 2: generator update skipped, non-finite batch" in log
    assert "iteration 2: fake_score update skipped, non-finite batch" in log
    steps = [ln for ln in log.splitlines() if "step 2/4" in ln or "step 4/4" in ln]
    assert len(steps) == 2 and all("skipped 2" in ln for ln in steps), steps
    assert "1 generator updates, 3 fake_score updates; skipped for non-finite values: 1 generator, 1 fake_score" in log


def test_an_all_nan_dataset_stops_under_skip_after_the_cap(files, tmp_path, single_process_world):
    out = tmp_path / "run"
    trainer = build_trainer(resolve(overrides=_overrides(files, files["all_nan"], out,
                                                         "train.max_consecutive_skips=2")))
    teacher = full_state_dict(trainer.models.teacher.module)
    with pytest.raises(NonFiniteError, match=r"2 fake_score updates in a row were skipped .*iteration 2"):
        trainer.train()
    trainer.writer.close()
    s = trainer.state
    assert (s.generator_updates, s.fake_score_updates, s.generator_skipped, s.fake_score_skipped) == (0, 0, 1, 2)
    generator = full_state_dict(trainer.models.generator.module)
    assert all(torch.equal(generator[k], teacher[k]) for k in teacher)  # never moved
    assert _scalars(out, "health/skipped_steps") == [(2, 3.0)]  # logged at the stop
    assert not (out / "checkpoints").exists()


def test_a_nan_teacher_prediction_is_caught_before_nan_to_num_hides_it(skip_run, monkeypatch):
    """dmd_grad's nan_to_num turns a NaN teacher x0 into a zero direction, a zero loss and zero
    gradients; AdamW's weight decay would still move the weights. The update must be skipped."""
    trainer, _, _ = skip_run
    monkeypatch.setattr(trainer, "teacher_x0", lambda x_t, t, batch: torch.full_like(x_t, NAN))
    before = full_state_dict(trainer.models.generator.module)
    skipped = trainer.state.generator_skipped
    trainer.generator_step([trainer.data.next()])
    assert trainer.state.generator_skipped == skipped + 1 and trainer.guard.found == ["teacher x0"]
    after = full_state_dict(trainer.models.generator.module)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_deepspeeds_own_overflow_skip_is_not_counted_as_an_update(skip_run, monkeypatch):
    """A finite loss whose gradient is NaN: nothing the guard checks is non-finite, DeepSpeed
    skips the step on its own, and the trainer must read that back from the engine."""
    trainer, _, _ = skip_run
    real = losses.fake_score_loss
    monkeypatch.setattr(losses, "fake_score_loss",
                        lambda v, eps, x0: real(v, eps, x0) + (v - v.detach()).abs().sqrt().sum())
    before = full_state_dict(trainer.models.fake_score.module)
    updates, skipped = trainer.state.fake_score_updates, trainer.state.fake_score_skipped
    trainer.fake_score_step([trainer.data.next()])
    assert trainer.guard.found == [] and not trainer.models.fake_score.was_step_applied()
    assert (trainer.state.fake_score_updates, trainer.state.fake_score_skipped) == (updates, skipped + 1)
    after = full_state_dict(trainer.models.fake_score.module)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_stop_halts_with_one_line_and_no_checkpoint_after_the_bad_step(files, tmp_path, single_process_world):
    out = tmp_path / "run"
    args = ["train"] + [a for o in _overrides(files, files["one_nan"], out, "train.nonfinite=stop",
                                              "checkpoint.interval_steps=1") for a in ("--set", o)]
    try:
        result = CliRunner().invoke(main, args)
    finally:
        # the CLI ends its process group on the way out; later tests build new engines on a new one
        # (this test runs last in this file: the trainers above belong to the old group)
        init_distributed("gloo")
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("megadmd: error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert "non-finite batch" in errors[0] and "update of iteration 2 (train.nonfinite=stop)" in errors[0]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000001"]
    assert (ckpts / "latest").read_text().strip() == "step-00000001"
