"""DMD2's GAN term: the loss formulas, the head's separation of real and fake, and where its
gradient goes."""
import math

import pytest
import torch

from megadmd.config import resolve
from megadmd.dmd import gan
from megadmd.models import build_wan
from megadmd.runner import build_trainer
from megadmd.zero import full_state_dict
from tests.helpers import TEST_WAN_CONFIG, save_test_dataset


def test_gan_losses_by_hand():
    zero = torch.zeros(4)
    # D = sigmoid(0) = 1/2 everywhere: -log(1/2) on each side
    assert gan.discriminator_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert gan.generator_loss(zero).item() == pytest.approx(math.log(2))
    big = torch.full((3,), 20.0)
    assert gan.discriminator_loss(big, -big).item() == pytest.approx(0.0, abs=1e-7)
    # the non-saturating generator loss still has gradient where D is sure the sample is fake
    x = torch.full((1,), -20.0, requires_grad=True)
    gan.generator_loss(x).backward()
    assert x.grad.item() == pytest.approx(-1.0, abs=1e-6)


def test_generator_gradient_reaches_the_generator_only_through_its_output():
    torch.manual_seed(0)
    generator = build_wan(TEST_WAN_CONFIG, seed=1)
    fake = build_wan(TEST_WAN_CONFIG, seed=2)
    gan.attach_gan_head(fake, hidden=16, seed=3)
    x = torch.randn(2, 4, 2, 4, 4)
    text = torch.randn(2, 6, 32)
    t = torch.tensor([500.0, 800.0])

    def x_t_of(gen_out):
        return 0.5 * gen_out + 0.5 * x  # a noised generator sample, differentiable in gen_out

    out = generator(x, t, text, return_dict=False)[0]
    loss = gan.generator_gan_loss(fake, 0, x_t_of(out), t, text, torch.float32)
    loss.backward()
    # the fake score (and its head) got no gradient and kept its requires_grad flags
    assert all(p.grad is None for p in fake.parameters())
    assert all(p.requires_grad for p in fake.parameters())
    # the generator's gradient is J^T g with g = dloss/d(generator output)
    out_detached = generator(x, t, text, return_dict=False)[0].detach().requires_grad_(True)
    g, = torch.autograd.grad(gan.generator_gan_loss(fake, 0, x_t_of(out_detached), t, text, torch.float32),
                             out_detached)
    direct = {n: p.grad.clone() for n, p in generator.named_parameters()}
    generator.zero_grad()
    (generator(x, t, text, return_dict=False)[0] * g).sum().backward()
    for n, p in generator.named_parameters():
        assert torch.allclose(direct[n], p.grad, atol=1e-6, rtol=1e-4), n


@pytest.fixture
def gan_trainer(tmp_path, test_model_dir, single_process_world):
    # an easy case: every real latent is far from what the random generator produces
    data = save_test_dataset(tmp_path / "data", num_samples=8)
    from megadmd.data.format import DatasetWriter, LatentDataset

    src = LatentDataset(data)
    w = DatasetWriter(tmp_path / "easy", text_dim=32, max_text_len=6, latent_shape=[4, 2, 4, 4])
    for i in range(8):
        s = src.get(i)
        w.add(s["text_embeds"][: s["text_len"]], s["caption"], torch.full((4, 2, 4, 4), 3.0))
    w.finish(src.negative()[0])
    cfg = resolve(overrides=[
        f"model.teacher_path={test_model_dir}", f"data.path={tmp_path / 'easy'}",
        f"output_dir={tmp_path / 'out'}", "train.micro_batch_size=4", "logging.tensorboard=false",
        "dmd.gan.enabled=true", "dmd.gan.discriminator_weight=1.0", "dmd.gan.hidden_dim=16",
        "dmd.gan.block_index=1", "optim.fake_score.lr=3e-3", "dmd.min_timestep_ratio=0.02",
        "dmd.max_timestep_ratio=0.3"])
    return build_trainer(cfg)


def test_head_separates_real_from_fake_after_a_few_discriminator_steps(gan_trainer):
    t = gan_trainer
    for _ in range(15):
        t.fake_score_step([t.data.next()])
    t.window.reduce()  # drop the training window
    t.fake_score_step([t.data.next()])
    v = t.window.reduce()
    assert v["gan/logit_real"] > v["gan/logit_fake"] + 1.0, v
    assert v["gan/accuracy_real"] == 1.0 and v["gan/accuracy_fake"] == 1.0, v
    assert v["loss/discriminator"] < 2 * math.log(2) * 0.5, v


def test_generator_gan_step_leaves_the_fake_score_untouched(gan_trainer):
    t = gan_trainer
    fake_before = full_state_dict(t.models.fake_score.module)
    gen_before = full_state_dict(t.models.generator.module)
    assert any(k.startswith("gan_head.") for k in fake_before)
    zero = t.models.fake_score.optimizer
    micro_before = zero.micro_step_id
    t.generator_step([t.data.next()])
    # the fake score's ZeRO-3 state saw no backward of its own: nothing stale for its next step
    assert zero.micro_step_id == micro_before and not zero.averaged_gradients
    assert all(p.grad is None for p in t.models.fake_score.module.parameters())
    fake_after = full_state_dict(t.models.fake_score.module)
    assert all(torch.equal(fake_before[k], fake_after[k]) for k in fake_before)
    gen_after = full_state_dict(t.models.generator.module)
    assert any(not torch.equal(gen_before[k], gen_after[k]) for k in gen_before)
    v = t.window.reduce()
    assert "loss/generator_gan" in v and "loss/generator_dmd" in v


class _PlainRole:
    """Stands in for an engine: a plain module, called and reachable as ``.module``."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_fake_score_gradient_is_clean_after_a_generator_gan_step(gan_trainer):
    """Guards against the silent DeepSpeed bug of calling one engine inside another role's loss:
    the fake score's next gradient must equal a from-scratch autograd gradient."""
    t = gan_trainer
    t.generator_step([t.data.next()])
    batch = t.data.next()
    # reference: the same loss on a plain fp32 copy of the fake score (with its head)
    plain = build_wan(TEST_WAN_CONFIG, seed=0)
    gan.attach_gan_head(plain, hidden=16, seed=0)
    plain.load_state_dict(full_state_dict(t.models.fake_score.module))
    engine = t.models.fake_score
    t.models.fake_score = _PlainRole(plain)
    try:
        ref_loss = t.fake_score_loss(batch)
    finally:
        t.models.fake_score = engine
    ref_loss.backward()
    ref_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in plain.parameters() if p.grad is not None))
    t.window.reduce()
    t.fake_score_step([batch])
    got = t.window.reduce()
    assert got["loss/fake_score"] == pytest.approx(ref_loss.item(), rel=1e-5)
    assert got["grad_norm/fake_score"] == pytest.approx(ref_norm.item(), rel=1e-4)


def test_judge_timesteps_are_uniform_in_the_range_and_one_expert_per_batch():
    g = torch.Generator().manual_seed(0)
    t = gan.judge_timesteps(torch.rand(20000, generator=g), 0.02, 0.5)
    assert float(t.min()) >= 20 and float(t.max()) <= 500
    hist = torch.histc(t, bins=8, min=20, max=500) / t.numel()
    assert torch.allclose(hist, torch.full((8,), 1 / 8), atol=0.01)
    # a two-expert boundary inside the range: every micro-batch on one side, still uniform overall
    batches = [gan.judge_timesteps(torch.rand(8, generator=g), 0.02, 0.5, 0.3, float(torch.rand(1, generator=g)))
               for _ in range(3000)]
    assert all(bool((b >= 300).all()) or bool((b < 300).all()) for b in batches)
    hist = torch.histc(torch.cat(batches), bins=8, min=20, max=500) / (8 * 3000)
    assert torch.allclose(hist, torch.full((8,), 1 / 8), atol=0.01)


def test_judge_inputs_share_noise_and_timestep_within_a_pair():
    real, fake = torch.zeros(2, 3), torch.ones(2, 3)
    eps = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    x = gan.judge_inputs(real, fake, eps, torch.tensor([500.0, 250.0]))
    # real: 0.5 * 0 + 0.5 * eps, 0.75 * 0 + 0.25 * eps; fake: the same plus (1 - sigma) * 1
    assert torch.allclose(x[:2], torch.tensor([[0.5, 1.0, 1.5], [0.0, 0.0, 0.0]]))
    assert torch.allclose(x[2:] - x[:2], torch.tensor([[0.5] * 3, [0.75] * 3]))


def test_head_pooling_mean_and_std_by_hand():
    head = gan.GANHead(4, 3, pooling="meanstd")
    tokens = torch.randn(2, 5, 4)
    h = head.token_features(tokens).float()
    pooled = torch.cat([h.mean(1), h.std(1, unbiased=False)], dim=-1)
    assert torch.allclose(head(tokens), head.out(pooled).squeeze(-1), atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        gan.GANHead(4, 3, pooling="max")


def test_head_trains_in_its_own_param_group(gan_trainer):
    """ZeRO-3 keeps the groups (flattened) with their own rate and betas."""
    groups = {g["name"]: g for g in gan_trainer.models.fake_score.optimizer.param_groups}
    assert set(groups) == {"all", "gan_head"}
    assert groups["gan_head"]["lr"] == pytest.approx(10 * 3e-3) and tuple(groups["gan_head"]["betas"]) == (0.9, 0.999)
    # the fake score keeps the preset's betas (tiny: beta1 = 0); the head has momentum of its own
    assert groups["all"]["lr"] == pytest.approx(3e-3) and tuple(groups["all"]["betas"]) == (0.0, 0.999)
    assert gan_trainer.models.fake_score.get_lr()[0] == pytest.approx(3e-3)
