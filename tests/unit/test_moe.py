"""Wan2.2 two-expert models: routing by timestep, expert-consistent draws, and updates that
touch only the expert that ran."""
import pytest
import torch

from megadmd import flow
from megadmd.config import ConfigError, resolve
from megadmd.dmd import gan
from megadmd.dmd.trainer import PHASE_FAKE_SCORE, PHASE_GENERATOR
from megadmd.models import WanExperts, build_wan
from megadmd.rng import Purpose
from megadmd.runner import build_trainer
from megadmd.zero import full_state_dict
from tests.helpers import TEST_WAN_CONFIG, save_test_dataset, save_tiny_wan22_pipeline


def test_routing_follows_the_timestep():
    high, low = build_wan(TEST_WAN_CONFIG, seed=0), build_wan(TEST_WAN_CONFIG, seed=1)
    both = WanExperts(high, low, boundary_ratio=0.875)
    x, text = torch.randn(3, 4, 2, 4, 4), torch.randn(3, 6, 32)
    t = torch.tensor([900.0, 875.0, 300.0])  # 875 is the boundary: high-noise expert
    with torch.no_grad():
        out = both(x, t, text)[0]
        assert torch.equal(out[:2], high(x[:2], t[:2], text[:2], return_dict=False)[0])
        assert torch.equal(out[2:], low(x[2:], t[2:], text[2:], return_dict=False)[0])
        assert torch.equal(both(x[:1], t[:1], text[:1])[0], high(x[:1], t[:1], text[:1], return_dict=False)[0])


def test_expert_split_by_hand_and_stratified_draws_stay_uniform():
    # shift 3, boundary 0.875: u_b = 0.875 / (3 - 2 * 0.875) = 0.7
    assert flow.expert_split_u(0.875, 3.0, 0.02, 0.98) == pytest.approx(0.7)
    assert flow.expert_split_u(0.01, 3.0, 0.02, 0.98) == 0.0 and flow.expert_split_u(0.99, 3.0, 0.02, 0.98) == 1.0
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([flow.stratified_u(torch.rand(8, generator=g), float(torch.rand(1, generator=g)), 0.7)
                       for _ in range(4000)])
    hist = torch.histc(draws, bins=10, min=0, max=1) / draws.numel()
    assert torch.allclose(hist, torch.full((10,), 0.1), atol=0.01)  # still uniform
    batch = flow.stratified_u(torch.rand(8, generator=g), 0.9, 0.7)
    assert bool((batch >= 0.7).all())  # one expert for the whole batch


def test_expert_draws_stay_on_their_side_of_the_boundary_in_float32():
    """At A14B's shift 12 and boundary 0.875, float32 rounding puts a few low-side draws just
    below the split at t >= 875 (the other expert); the clamp keeps every draw on its side."""
    shift, boundary, lo, hi = 12.0, 0.875, 0.02, 0.98
    split = flow.expert_split_u(boundary, shift, lo, hi)
    top = (1 - torch.arange(1, 200001, dtype=torch.float64) * 2.0**-24).float()  # the low side's end
    bottom = (torch.arange(0, 200000, dtype=torch.float64) * 2.0**-24).float()  # the high side's start
    raw = flow.sample_score_timesteps(flow.stratified_u(top, 0.0, split), shift, lo, hi)
    assert int((raw >= 875).sum()) > 0  # what the clamp is for
    low = flow.expert_score_timesteps(top, 0.0, boundary, shift, lo, hi)
    high = flow.expert_score_timesteps(bottom, split, boundary, shift, lo, hi)
    assert low.dtype == torch.float32 and bool((low < 875).all()) and bool((high >= 875).all())
    kept = raw < 875
    assert torch.equal(low[kept], raw[kept])  # only the crossing draws move, by one float32 step
    assert float((low - raw).abs().max()) < 1e-3
    # and the experts route them that way (they compare the float32 timestep with the boundary)
    experts = WanExperts(torch.nn.Identity(), torch.nn.Identity(), boundary)
    assert not bool((low >= experts.boundary_t).any()) and bool((high >= experts.boundary_t).all())


def _moe_trainer(tmp_path, *extra):
    model = save_tiny_wan22_pipeline(tmp_path / "wan22")
    data = save_test_dataset(tmp_path / "data", num_samples=8)
    return build_trainer(resolve(overrides=[
        f"model.teacher_path={model}", f"data.path={data}", f"output_dir={tmp_path / 'out'}",
        "logging.tensorboard=false", "model.boundary_ratio=0.875", "dmd.denoising_steps=[1000,500]",
        "train.micro_batch_size=2", "optim.generator.lr=1e-2", "optim.fake_score.lr=1e-2",
        "dmd.gan.enabled=true", "dmd.gan.hidden_dim=16", *extra]))


@pytest.fixture
def moe_trainer(tmp_path, single_process_world):
    return _moe_trainer(tmp_path)


def test_without_the_first_step_only_the_later_steps_expert_is_drawn(tmp_path, single_process_world):
    """Steps [1000, 500] at boundary 875: the high-noise expert owns only the first step, so with
    dmd.train_first_step=false every draw is the second step (and the low-noise expert)."""
    t = _moe_trainer(tmp_path, "dmd.train_first_step=false")
    drawn = {int(k) for _ in range(8) for k in t.generator_step_indices(t.data.next(), PHASE_GENERATOR)}
    assert drawn == {1}


def _changed(before: dict, after: dict) -> set:
    return {e for e in ("high", "low") if any(not torch.equal(before[k], after[k]) for k in before
                                              if k.startswith(f"{e}."))}


def test_each_expert_changes_only_when_its_range_was_trained(moe_trainer):
    t = moe_trainer
    seen = {"generator": set(), "fake_score": set()}
    for _ in range(6):
        batch = t.data.next()
        steps = torch.tensor(t.steps)[t.generator_step_indices(batch, PHASE_GENERATOR)]
        expected = {"high" if float(s) >= 875 else "low" for s in steps}
        before = full_state_dict(t.models.generator.module)
        t.generator_step([batch])
        assert _changed(before, full_state_dict(t.models.generator.module)) == expected
        seen["generator"] |= expected
        ts = t.score_timesteps(batch, __import__("megadmd.rng").rng.Purpose.FAKE_TIMESTEP, PHASE_FAKE_SCORE)
        # the denoising forward's expert, and the discriminator's forward of its own (its judge
        # timesteps, one expert per micro-batch: here always the low-noise one, below t = 500)
        judge = t.gan_timesteps(batch, PHASE_FAKE_SCORE)
        expected = {"high" if float(x) >= 875 else "low" for x in torch.cat([ts, judge])}
        before = full_state_dict(t.models.fake_score.module)
        t.fake_score_step([batch])
        changed = _changed(before, full_state_dict(t.models.fake_score.module))
        assert changed == expected
        seen["fake_score"] |= expected
    assert seen["generator"] == {"high", "low"} and seen["fake_score"] == {"high", "low"}


def test_a_missing_second_expert_fails_clearly(tmp_path, test_model_dir, test_dataset_dir):
    cfg = resolve(overrides=[f"model.teacher_path={test_model_dir}", f"data.path={test_dataset_dir}",
                             f"output_dir={tmp_path / 'o'}", "model.boundary_ratio=0.875"])
    from megadmd.preflight import preflight_train

    with pytest.raises(ConfigError, match="needs both transformer and transformer_2"):
        preflight_train(cfg, 1)


def test_gan_halves_share_one_expert_and_the_head_sees_every_sample(moe_trainer, monkeypatch):
    """The discriminator's real and generated halves run in one forward: were they on different
    experts, the head would keep one expert's B logits instead of 2B and the loss became NaN
    (main's bug, issue 23). Each pair shares its judge timestep, and the judge timesteps of a
    micro-batch stay on one side of the boundary even when their range straddles it."""
    t = moe_trainer
    t.dmd.gan.timestep_range = [0.5, 0.98]  # straddles the boundary at 875
    seen = []
    real_loss = gan.discriminator_loss
    monkeypatch.setattr(gan, "discriminator_loss", lambda r, f: seen.append((len(r), len(f))) or real_loss(r, f))
    for _ in range(2):
        t.fake_score_step([t.data.next()])
    assert seen == [(2, 2), (2, 2)]
    assert t.state.fake_score_updates == 2 and t.state.fake_score_skipped == 0
    assert all(v == v for v in t.window.reduce().values())  # no NaN logged
    sides = set()
    for _ in range(16):
        judge = t.gan_timesteps(t.data.next(), PHASE_FAKE_SCORE)
        side = {bool(x >= 875) for x in judge}
        assert len(side) == 1
        sides |= side
    assert sides == {True, False}


def test_a_skipped_update_restores_the_rate_of_the_expert_that_did_not_run(moe_trainer):
    """restrict_step_to_used_experts zeroes the idle expert's rate and relies on the LR
    scheduler's step to restore it; a skipped step does not step the scheduler."""
    t = moe_trainer
    t.dmd.gan.enabled = False  # the GAN's own forward (on the low-noise expert) would run both experts

    def side(batch):
        return "high" if float(t.score_timesteps(batch, Purpose.FAKE_TIMESTEP, PHASE_FAKE_SCORE)[0]) >= 875 else "low"

    bad = t.data.next()
    bad.latents = torch.full_like(bad.latents, float("nan"))
    t.fake_score_step([bad])
    assert t.state.fake_score_skipped == 1 and t.state.fake_score_updates == 0
    assert all(g["lr"] > 0 for g in t.models.fake_score.optimizer.param_groups)
    batch = t.data.next()
    while side(batch) == side(bad):
        batch = t.data.next()
    before = full_state_dict(t.models.fake_score.module)
    t.fake_score_step([batch])
    assert _changed(before, full_state_dict(t.models.fake_score.module)) == {side(batch)}


class _TinyExpert(torch.nn.Module):
    """Stands in for a Wan DiT inside WanExperts: one linear layer, the DiT's call signature."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                return_dict=False):
        return (self.lin(hidden_states),)


def test_the_idle_expert_steps_with_a_zero_gradient_not_its_last_one(single_process_world):
    """ZeRO-3 keeps a parameter's last gradient until a new one overwrites it: the idle expert
    stepped with its stale gradient (counted in the global norm, pushed into its Adam moments),
    and after a skipped step with a NaN one, which made every later step skip as well."""
    from megadmd.roles import param_groups, restrict_step_to_used_experts
    from tests.helpers import tiny_zero3_engine

    module = WanExperts(_TinyExpert(), _TinyExpert(), boundary_ratio=0.875)
    engine = tiny_zero3_engine(module=module, groups=param_groups(module))
    opt = engine.optimizer

    def exp_avg(group: int) -> torch.Tensor:
        return opt.optimizer.state[opt.fp32_partitioned_groups_flat[group]]["exp_avg"].clone()

    def update(t: float, scale: float = 1.0) -> None:
        out = engine(torch.randn(3, 4), torch.full((3,), t), None)[0]
        engine.backward(out.pow(2).mean() * scale)
        restrict_step_to_used_experts(engine)
        engine.step()

    update(900.0)  # the high expert (group 0)
    high = exp_avg(0)
    update(100.0)  # the low expert only
    assert torch.allclose(exp_avg(0), high * 0.9, rtol=1e-6, atol=0)  # moments only decay (beta1 0.9)
    update(900.0, scale=float("nan"))  # DeepSpeed skips it
    assert not engine.was_step_applied()
    from megadmd.roles import recover_from_skipped_step

    recover_from_skipped_step(engine)
    update(100.0)
    assert engine.was_step_applied()  # no stale NaN from the high expert in the norm
    assert bool(torch.isfinite(exp_avg(0)).all())
