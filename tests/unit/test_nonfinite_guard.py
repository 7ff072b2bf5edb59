"""The non-finite guard (dmd/guard.py) on a real ZeRO-3 engine: a bad update leaves parameters,
Adam moments and the LR schedule untouched; DeepSpeed's own overflow skip is read back; stop
and the cap end the run with NonFiniteError; applied and skipped updates are counted apart."""
import pytest
import torch

from megadmd.dmd.guard import NonFiniteError, NonFiniteGuard, skip_counts
from megadmd.dmd.trainer import TrainState
from megadmd.zero import full_state_dict
from tests.helpers import tiny_zero3_engine

NAN = float("nan")


@pytest.fixture
def engine(single_process_world):
    return tiny_zero3_engine()


def _snapshot(engine) -> dict:
    """Parameters, Adam moments and the schedule position of an engine."""
    opt = engine.optimizer.optimizer
    moments = {i: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for i, s in enumerate(opt.state.values())}
    return {"params": {k: v.clone() for k, v in full_state_dict(engine.module).items()}, "moments": moments,
            "sched": engine.lr_scheduler.last_epoch, "lr": [g["lr"] for g in opt.param_groups]}


def _same(a: dict, b: dict) -> bool:
    if a["sched"] != b["sched"] or a["lr"] != b["lr"] or a["moments"].keys() != b["moments"].keys():
        return False
    if any(not torch.equal(a["params"][k], b["params"][k]) for k in a["params"]):
        return False
    return all(torch.equal(a["moments"][i][k], b["moments"][i][k]) for i in a["moments"] for k in a["moments"][i])


def _update(engine, guard, state, x, flag=None, loss_fn=None, step=1) -> bool:
    """One guarded update over the micro-batches of ``x`` ([accum, B, 8]); ``flag`` marks a
    (micro-batch index, check name) as non-finite, as the trainer's checks would."""
    guard.begin()
    for i, xb in enumerate(x):
        if flag is not None and flag[0] == i:
            guard.check(flag[1], torch.tensor([NAN]))
        out = engine(xb)
        loss = loss_fn(out) if loss_fn else out.pow(2).mean()
        engine.backward(guard.gate(loss, engine.is_gradient_accumulation_boundary(), "fake_score", step))
        engine.step()
    return guard.finish("fake_score", engine, step, state)


def test_a_clean_update_is_applied_and_counted(engine):
    guard, state = NonFiniteGuard("skip", 3), TrainState()
    before = _snapshot(engine)
    assert _update(engine, guard, state, torch.randn(1, 4, 8))
    assert state.fake_score_updates == 1 and state.fake_score_skipped == 0
    assert not _same(before, _snapshot(engine))


@pytest.mark.parametrize("what", ["batch", "teacher x0", "loss"])
def test_a_flagged_update_leaves_parameters_moments_and_schedule_untouched(engine, what):
    """Also when the loss and gradients themselves are finite (a NaN teacher x0 that
    dmd_grad's nan_to_num would hide): the guard's NaN loss makes DeepSpeed drop the update."""
    guard, state = NonFiniteGuard("skip", 3), TrainState()
    _update(engine, guard, state, torch.randn(1, 4, 8))  # Adam moments exist from here
    before = _snapshot(engine)
    assert not _update(engine, guard, state, torch.randn(1, 4, 8), flag=(0, what), step=2)
    assert _same(before, _snapshot(engine))
    assert guard.found == [what] and engine.skipped_steps == 1
    assert (state.fake_score_updates, state.fake_score_skipped) == (1, 1)
    assert skip_counts(state)["health/skipped_steps"] == 1.0
    assert _update(engine, guard, state, torch.randn(1, 4, 8), step=3)  # and training goes on
    assert state.fake_score_updates == 2


def test_a_flag_on_an_early_micro_batch_drops_the_whole_accumulated_update(single_process_world):
    engine = tiny_zero3_engine(grad_accum_steps=2)
    guard, state = NonFiniteGuard("skip", 3), TrainState()
    _update(engine, guard, state, torch.randn(2, 4, 8))
    before = _snapshot(engine)
    assert not _update(engine, guard, state, torch.randn(2, 4, 8), flag=(0, "batch"), step=2)
    assert _same(before, _snapshot(engine))
    assert _update(engine, guard, state, torch.randn(2, 4, 8), step=3)
    assert not _same(before, _snapshot(engine))


def _finite_loss_nan_grad(out):
    """A finite loss whose gradient is NaN: d sqrt(|u|)/du at u = 0 is inf * 0."""
    return out.pow(2).mean() + (out - out.detach()).abs().sqrt().sum()


def test_deepspeeds_own_overflow_skip_is_read_back(engine):
    """Nothing the guard checks is non-finite, DeepSpeed finds the gradient norm NaN and skips:
    the guard must report the update as skipped, from the engine, not count it as applied."""
    guard, state = NonFiniteGuard("skip", 3), TrainState()
    _update(engine, guard, state, torch.randn(1, 4, 8))
    before = _snapshot(engine)
    assert not _update(engine, guard, state, torch.randn(1, 4, 8), loss_fn=_finite_loss_nan_grad, step=2)
    assert guard.found == [] and not engine.was_step_applied()
    assert (state.fake_score_updates, state.fake_score_skipped) == (1, 1)
    assert _same(before, _snapshot(engine))


def test_stop_raises_before_the_update(engine):
    guard, state = NonFiniteGuard("stop", 3), TrainState()
    before = _snapshot(engine)
    with pytest.raises(NonFiniteError, match=r"non-finite loss in the fake_score update of iteration 7 "
                                             r"\(train.nonfinite=stop\)"):
        _update(engine, guard, state, torch.randn(1, 4, 8), flag=(0, "loss"), step=7)
    assert _same(before, _snapshot(engine))
    with pytest.raises(NonFiniteError, match="non-finite gradient norm"):
        _update(engine, guard, state, torch.randn(1, 4, 8), loss_fn=_finite_loss_nan_grad, step=8)


def test_the_consecutive_skip_cap_stops_and_an_applied_update_resets_it(engine):
    guard, state = NonFiniteGuard("skip", 2), TrainState()
    assert not _update(engine, guard, state, torch.randn(1, 4, 8), flag=(0, "batch"))
    assert _update(engine, guard, state, torch.randn(1, 4, 8))
    assert not _update(engine, guard, state, torch.randn(1, 4, 8), flag=(0, "batch"))
    with pytest.raises(NonFiniteError, match=r"2 fake_score updates in a row were skipped"):
        _update(engine, guard, state, torch.randn(1, 4, 8), flag=(0, "batch"), step=4)
    assert state.fake_score_skipped == 3
    # 0 disables the cap
    guard = NonFiniteGuard("skip", 0)
    for _ in range(3):
        assert not _update(engine, guard, state, torch.randn(1, 4, 8), flag=(0, "batch"))


def test_an_update_deepspeed_applies_despite_the_nan_loss_is_an_error(engine, monkeypatch):
    """The safety net: if a DeepSpeed version stopped skipping non-finite steps, the run must
    stop rather than count (and later save) the poisoned weights."""
    guard, state = NonFiniteGuard("skip", 3), TrainState()
    monkeypatch.setattr(engine, "was_step_applied", lambda: True)
    with pytest.raises(RuntimeError, match="does not skip such steps"):
        _update(engine, guard, state, torch.randn(1, 4, 8), flag=(0, "batch"))


def test_train_state_loads_checkpoints_that_predate_the_skip_counters():
    s = TrainState()
    s.load_state_dict({"step": 5, "generator_updates": 1, "fake_score_updates": 5, "world_size": 2})
    assert (s.step, s.generator_updates, s.fake_score_updates, s.generator_skipped) == (5, 1, 5, 0)
    assert TrainState(**s.state_dict()) == s
