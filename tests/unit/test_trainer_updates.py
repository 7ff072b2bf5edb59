"""One-process DeepSpeed engines: what each update changes, and how often each role steps."""
import pytest
import torch

from megadmd.config import resolve
from megadmd.dmd.trainer import PHASE_GENERATOR
from megadmd.runner import build_trainer
from megadmd.zero import full_state_dict


def _cfg(tmp_path, model_dir, data_dir, *extra):
    return resolve(overrides=[
        f"model.teacher_path={model_dir}", f"data.path={data_dir}", f"output_dir={tmp_path / 'out'}",
        "train.micro_batch_size=2", "logging.tensorboard=false", "train.max_steps=12",
        "optim.generator.lr=1e-3", "optim.fake_score.lr=1e-3", *extra])


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def trainer(tmp_path, test_model_dir, test_dataset_dir, single_process_world):
    return build_trainer(_cfg(tmp_path, test_model_dir, test_dataset_dir))


def test_generator_step_moves_x0_against_grad_and_touches_nothing_else(trainer):
    m = trainer.models
    batch = trainer.data.next()
    x0 = trainer.generator_x0(m.generator, batch, PHASE_GENERATOR)
    _, grad, _ = trainer.dmd_loss(x0, batch)
    before = {r: full_state_dict(m.engine(r).module) for r in ("teacher", "fake_score", "generator")}
    trainer.generator_step([batch])
    with torch.no_grad():  # same batch, same keyed noise and step index as before the update
        x0_after = trainer.generator_x0(m.generator.module, batch, PHASE_GENERATOR)
    assert float(((x0_after - x0.detach()) * grad).sum()) < 0
    assert _same(before["teacher"], full_state_dict(m.teacher.module))
    assert _same(before["fake_score"], full_state_dict(m.fake_score.module))
    assert not _same(before["generator"], full_state_dict(m.generator.module))


def test_fake_score_step_changes_only_the_fake_score(trainer):
    m = trainer.models
    before = {r: full_state_dict(m.engine(r).module) for r in ("teacher", "fake_score", "generator")}
    trainer.fake_score_step([trainer.data.next()])
    assert _same(before["teacher"], full_state_dict(m.teacher.module))
    assert _same(before["generator"], full_state_dict(m.generator.module))
    assert not _same(before["fake_score"], full_state_dict(m.fake_score.module))


def test_update_counts_and_frozen_teacher(trainer):
    m = trainer.models
    teacher_before = full_state_dict(m.teacher.module)
    trainer.train()  # 12 iterations, generator_update_interval 5
    assert m.generator.global_steps == 2  # iterations 5 and 10
    assert m.fake_score.global_steps == 12
    assert trainer.state.generator_updates == 2 and trainer.state.fake_score_updates == 12
    # the generator's LR schedule steps only with the generator
    assert m.generator.lr_scheduler.last_epoch == 2
    assert m.fake_score.lr_scheduler.last_epoch == 12
    assert _same(teacher_before, full_state_dict(m.teacher.module))
    assert all(not p.requires_grad for p in m.teacher.module.parameters())
    assert not m.teacher.module.training


def test_gradient_accumulation_draws_distinct_micro_batches(tmp_path, test_model_dir, test_dataset_dir,
                                                            single_process_world):
    t = build_trainer(_cfg(tmp_path, test_model_dir, test_dataset_dir, "train.grad_accum_steps=2",
                           "train.max_steps=5"))
    seen = []
    original = t.data.next

    def spy():
        b = original()
        seen.append(b.positions.tolist())
        return b

    t.data.next = spy
    t.train()
    assert len(seen) == 10  # 2 micro-batches per iteration
    flat = [p for ps in seen for p in ps]
    assert len(set(flat)) == len(flat)  # no micro-batch reused
    assert t.models.generator.global_steps == 1 and t.models.fake_score.global_steps == 5


def test_bf16_training_with_gan_ema_and_a_checkpoint(tmp_path, test_model_dir, test_dataset_dir,
                                                     single_process_world):
    """bf16 compute (the GPU default) on CPU: trainable modules hold bf16 shards, the optimizer fp32
    masters; both updates, the GAN head, the EMA and a checkpoint work."""
    t = build_trainer(_cfg(tmp_path, test_model_dir, test_dataset_dir, "model.precision=bf16",
                           "dmd.gan.enabled=true", "dmd.gan.hidden_dim=16", "ema.decay=0.9", "train.max_steps=5"))
    for role in ("generator", "fake_score"):
        e = t.models.engine(role)
        assert {p.ds_tensor.dtype for p in e.module.parameters()} == {torch.bfloat16}
        assert {f.dtype for f in e.optimizer.fp32_partitioned_groups_flat} == {torch.float32}
    # Loaded straight at bf16 (half the host memory of an fp32 load), the shards hold exactly the
    # checkpoint's weights rounded to bf16, the GAN head aside.
    from megadmd.models import load_wan

    saved = load_wan(test_model_dir).state_dict()
    for role in ("generator", "fake_score"):
        got = full_state_dict(t.models.engine(role).module)
        for k, v in saved.items():
            assert torch.equal(got[k], v.to(torch.bfloat16)), (role, k)
    t.train()
    assert t.state.generator_updates == 1 and t.ema.started
    path = t.checkpointer.save(t)
    assert (path / "manifest.json").is_file()
    logged = t.history[-1][1]
    assert "loss/generator" in logged and all(v == v for v in logged.values())  # logged, no NaN


def test_ema_follows_the_decay_recursion_from_its_start_step(tmp_path, test_model_dir, test_dataset_dir,
                                                              single_process_world):
    """The EMA really moves under ZeRO-3 (the usual gather-based pattern silently never does) and
    equals the recursion ema = decay * ema + (1 - decay) * generator over the generator updates at
    or after ema.start_step, starting from the weights of the first such update."""
    t = build_trainer(_cfg(tmp_path, test_model_dir, test_dataset_dir, "ema.decay=0.75", "ema.start_step=6",
                           "dmd.generator_update_interval=2"))
    expected, updates = None, 0
    for step in range(1, 13):
        t.train_step(step)
        if t.state.generator_updates > updates:
            updates = t.state.generator_updates
            if step < 6:
                assert not t.ema.started
                continue
            now = full_state_dict(t.models.generator.module)
            expected = now if expected is None else {k: 0.75 * expected[k] + 0.25 * now[k] for k in now}
    assert t.ema.num_updates == 4  # generator updates at iterations 6, 8, 10 and 12
    got = t.ema.full_state_dict()
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
    generator = full_state_dict(t.models.generator.module)
    assert any(not torch.equal(got[k], generator[k]) for k in got)  # an average, not a copy


def test_teacher_x0_guides_the_caption_away_from_the_negative_prompt(trainer):
    """The real score: CFG of the teacher's x0 with the batch's text as the condition and the
    dataset's negative embedding as the uncondition, in the configured form (offset by default)."""
    from megadmd import flow
    from megadmd.models import predict_velocity

    t, batch = trainer, trainer.data.next()
    b = batch.size
    x_t = torch.randn(b, *batch.latents.shape[1:], generator=torch.Generator().manual_seed(3))
    ts = torch.tensor([900.0, 400.0][:b])
    sigma = flow.sigma_from_t(ts).view(-1, 1, 1, 1, 1)
    teacher = t.models.teacher.module
    with torch.no_grad():
        v_c = predict_velocity(teacher, x_t, ts, batch.text_embeds, torch.float32)
        v_u = predict_velocity(teacher, x_t, ts, t.data.negative(b), torch.float32)
        got = t.teacher_x0(x_t, ts, batch)
    x0_c, x0_u = x_t - sigma * v_c, x_t - sigma * v_u
    s = t.dmd.guidance_scale
    assert t.dmd.cfg_form == "offset" and s > 0
    torch.testing.assert_close(got, x0_c + s * (x0_c - x0_u), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, x0_u + s * (x0_u - x0_c), rtol=1e-3, atol=1e-4)  # the swap differs


def test_guidance_interval_guides_only_the_samples_inside_it(tmp_path, test_model_dir, test_dataset_dir,
                                                               single_process_world):
    """dmd.guidance_interval=[0.5, 1]: t=900 gets the guided x0, t=400 the conditional x0."""
    from megadmd import flow
    from megadmd.models import predict_velocity

    t = build_trainer(_cfg(tmp_path, test_model_dir, test_dataset_dir, "dmd.guidance_interval=[0.5,1.0]"))
    batch = t.data.next()
    assert batch.size == 2
    x_t = torch.randn(2, *batch.latents.shape[1:], generator=torch.Generator().manual_seed(3))
    ts = torch.tensor([900.0, 400.0])
    sigma = flow.sigma_from_t(ts).view(-1, 1, 1, 1, 1)
    teacher = t.models.teacher.module
    with torch.no_grad():
        x0_c = x_t - sigma * predict_velocity(teacher, x_t, ts, batch.text_embeds, torch.float32)
        x0_u = x_t - sigma * predict_velocity(teacher, x_t, ts, t.data.negative(2), torch.float32)
        got = t.teacher_x0(x_t, ts, batch)
    s = t.dmd.guidance_scale
    torch.testing.assert_close(got[0], (x0_c + s * (x0_c - x0_u))[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], x0_c[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(x0_c[1], x0_u[1], rtol=1e-3, atol=1e-4)  # guidance would have changed it


def test_train_first_step_false_trains_and_feeds_the_fake_score_only_later_steps(
        tmp_path, test_model_dir, test_dataset_dir, single_process_world):
    """Synthetic-latent mode: the generator's step is drawn from the later entries only, evenly,
    for both updates; by default every entry is drawn."""
    from megadmd.dmd.trainer import PHASE_FAKE_SCORE

    for train_first, expected in ((True, {0, 1, 2}), (False, {1, 2})):
        t = build_trainer(_cfg(tmp_path / str(train_first), test_model_dir, test_dataset_dir,
                               f"dmd.train_first_step={str(train_first).lower()}"))
        seen = {PHASE_GENERATOR: [], PHASE_FAKE_SCORE: []}
        for _ in range(30):
            batch = t.data.next()
            for phase in seen:
                seen[phase] += t.generator_step_indices(batch, phase).tolist()
        for phase, idx in seen.items():
            assert set(idx) == expected, (train_first, phase)
            assert min(idx.count(k) for k in expected) >= 10  # all of them, roughly evenly (of 60)
