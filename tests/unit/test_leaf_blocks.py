"""deepspeed.leaf_blocks (ZeRO-3 leaf modules per transformer block) and the generator's one
engine call for the DMD exit step and a one-step regression (DMDTrainer.generator_forward)."""
import pytest
import torch

from megadmd.config import RunConfig, resolve
from megadmd.dmd.trainer import PHASE_GENERATOR
from megadmd.roles import add_leaf_blocks
from megadmd.runner import build_trainer
from megadmd.zero import block_classes, full_state_dict, has_leaf_blocks, leaf_block_roles
from tests.helpers import save_test_dataset

WAN_BLOCK = "diffusers.models.transformers.transformer_wan.WanTransformerBlock"


def test_leaf_block_roles_name_why_a_role_keeps_module_hooks():
    cfg = RunConfig()
    cfg.dmd.regression.weight = 1.0
    cfg.dmd.regression.num_steps = 1
    assert leaf_block_roles(cfg.dmd) == {"generator": "", "fake_score": "", "teacher": ""}
    cfg.dmd.regression.num_steps = 0  # the whole chain: the generator runs once per step
    assert "num_steps" in leaf_block_roles(cfg.dmd)["generator"]
    cfg.dmd.regression.weight = 0.0  # without the regression num_steps does not matter
    assert leaf_block_roles(cfg.dmd)["generator"] == ""
    cfg.dmd.gan.enabled = True  # its forwards are one call (DMDTrainer.fake_score_forward) ...
    assert leaf_block_roles(cfg.dmd) == {"generator": "", "fake_score": "", "teacher": ""}
    why = leaf_block_roles(cfg.dmd, two_experts=True)  # ... but two with two experts
    assert "GAN" in why["fake_score"] and why["generator"] == why["teacher"] == ""
    cfg.dmd.gan.enabled = False
    cfg.model.activation_checkpointing.generator = True
    why = leaf_block_roles(cfg.dmd, (), cfg.model.activation_checkpointing)
    assert "activation_checkpointing.generator" in why["generator"] and why["fake_score"] == ""
    assert all(leaf_block_roles(cfg.dmd, ("generator",)).values())  # LoRA: no role


def test_block_classes_and_the_merge_with_a_users_leaf_classes(test_model_dir):
    from megadmd.models import load_role_model

    module = load_role_model(test_model_dir, torch.float32, None, what="teacher")
    assert block_classes(module) == [WAN_BLOCK]
    ds = {"zero_optimization": {"stage": 3}}
    add_leaf_blocks(ds, module)
    assert ds["zero_optimization"]["leaf_module"] == {"classes": [WAN_BLOCK]}
    ds = {"zero_optimization": {"stage": 3, "leaf_module": {"classes": "my.Block", "names": ["x"]}}}
    add_leaf_blocks(ds, module)
    add_leaf_blocks(ds, module)  # once only
    assert ds["zero_optimization"]["leaf_module"] == {"classes": ["my.Block", WAN_BLOCK], "names": ["x"]}


def _trainer(tmp_path, model_dir, data, name, *extra):
    return build_trainer(resolve(overrides=[
        f"model.teacher_path={model_dir}", f"data.path={data}", f"output_dir={tmp_path / name}",
        "logging.tensorboard=false", "logging.interval_steps=1", "train.micro_batch_size=2", "train.max_steps=4",
        "dmd.simulate_generator_forward=true", "dmd.train_first_step=false", "dmd.generator_update_interval=1",
        "dmd.regression.weight=1.0", "dmd.regression.num_steps=1", "dmd.regression.batch_size=3",
        "optim.generator.lr=1e-3", "optim.fake_score.lr=1e-3", *extra]))


@pytest.fixture
def pairs(tmp_path):
    return save_test_dataset(tmp_path / "pairs", num_samples=8, with_noise=True)


def test_one_call_for_the_exit_step_and_the_regression_equals_two(tmp_path, test_model_dir, pairs,
                                                                  single_process_world, monkeypatch):
    """The stacked forward gives the x0 of both forwards and, after an update, the same losses,
    gradient norm and parameters."""
    import megadmd.dmd.trainer as trainer_mod

    one, two = (_trainer(tmp_path, test_model_dir, pairs, n) for n in ("one", "two"))
    batch = one.data.next()
    two.data.next()
    x0, (x0_reg, rb) = one.generator_forward(batch)
    with torch.no_grad():
        assert torch.allclose(x0, two.generator_x0(two.models.generator, batch, PHASE_GENERATOR), atol=1e-6)
        assert torch.allclose(x0_reg, two.regression_x0(rb), atol=1e-6)
    one.models.generator.zero_grad()
    monkeypatch.setattr(trainer_mod, "stackable", lambda a, b: False)  # `two` takes the two-forward path
    two.generator_step([batch])
    monkeypatch.undo()
    one.generator_step([batch])
    a, b = dict(one.window.reduce()), dict(two.window.reduce())
    for k in ("loss/generator", "loss/generator_regression", "loss/generator_dmd", "grad_norm/generator"):
        assert a[k] == pytest.approx(b[k], rel=1e-5), k
    sa, sb = full_state_dict(one.models.generator.module), full_state_dict(two.models.generator.module)
    worst = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    assert 0 < float((sa["proj_out.weight"] - full_state_dict(two.models.teacher.module)["proj_out.weight"])
                     .abs().max())  # the update moved the generator
    # Adam's first step moves every parameter by about lr (1e-3) whatever its gradient's size, so
    # the stacked call's rounding shows here at 1e-6; a wrong input or split moves whole steps
    assert worst < 1e-5, worst


def test_leaf_blocks_train_exactly_as_module_hooks(tmp_path, test_model_dir, pairs, single_process_world, capsys):
    leaf = _trainer(tmp_path, test_model_dir, pairs, "leaf", "deepspeed.leaf_blocks=true")
    assert "module by module" not in capsys.readouterr().out  # the megadmd logger writes to stdout
    plain = _trainer(tmp_path, test_model_dir, pairs, "plain")
    for role in ("generator", "fake_score", "teacher"):
        assert has_leaf_blocks(leaf.models.engine(role).module), role
        assert not has_leaf_blocks(plain.models.engine(role).module), role
    leaf.train()
    plain.train()
    assert [s for s, _ in leaf.history] == [1, 2, 3, 4]
    for (_, va), (_, vb) in zip(leaf.history, plain.history):
        for k in ("loss/generator", "loss/generator_regression", "loss/fake_score", "grad_norm/fake_score"):
            assert va[k] == vb[k], k
    for role in ("generator", "fake_score"):
        sa = full_state_dict(leaf.models.engine(role).module)
        sb = full_state_dict(plain.models.engine(role).module)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), role


def test_one_fake_score_call_for_denoising_and_the_gan_head_equals_two(tmp_path, test_model_dir, pairs,
                                                                        single_process_world):
    """With the GAN term the fake score's denoising forward and the head's forward on real and
    generated latents are one engine call: the same velocity, logits, losses and update as two."""
    gan_on = ("dmd.gan.enabled=true", "dmd.gan.hidden_dim=8")
    one, two = (_trainer(tmp_path, test_model_dir, pairs, n, *gan_on) for n in ("one", "two"))
    two.fake_score_one_call = False
    batch = one.data.next()
    two.data.next()
    x0 = torch.randn(2, *one.latent_shape(batch))
    x_t, t = torch.randn_like(x0), torch.tensor([900.0, 120.0])
    with torch.no_grad():
        (va, la), (vb, lb) = one.fake_score_forward(batch, x_t, t, x0), two.fake_score_forward(batch, x_t, t, x0)
    assert la.shape == (4,) and torch.allclose(va, vb, atol=1e-6) and torch.allclose(la, lb, atol=1e-6)
    assert not torch.allclose(la[:2], la[2:])  # real and generated latents are judged apart
    one.fake_score_step([batch])
    two.fake_score_step([batch])
    a, b = dict(one.window.reduce()), dict(two.window.reduce())
    for k in ("loss/fake_score", "loss/discriminator", "loss/fake_score_denoise", "gan/logit_real",
              "grad_norm/fake_score"):
        assert a[k] == pytest.approx(b[k], rel=1e-5), k
    sa, sb = full_state_dict(one.models.fake_score.module), full_state_dict(two.models.fake_score.module)
    worst = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    assert worst < 1e-5, worst  # one Adam step moves a parameter by about lr (1e-3)


def test_leaf_blocks_with_the_gan_term_train_exactly_as_module_hooks(tmp_path, test_model_dir, pairs,
                                                                     single_process_world, capsys, monkeypatch):
    """Every role fetches whole blocks with the GAN term on, including the fake score that the GAN's
    generator loss runs inside the generator's backward."""
    import megadmd.dmd.trainer as trainer_mod

    gan_on = ("dmd.gan.enabled=true", "dmd.gan.hidden_dim=8")
    t = _trainer(tmp_path, test_model_dir, pairs, "gan", "deepspeed.leaf_blocks=true", *gan_on)
    assert "module by module" not in capsys.readouterr().out
    assert all(has_leaf_blocks(t.models.engine(r).module) for r in ("generator", "fake_score", "teacher"))
    plain = _trainer(tmp_path, test_model_dir, pairs, "gan_plain", *gan_on)
    t.train()
    plain.train()
    assert "loss/generator_gan" in t.history[-1][1]
    for (_, va), (_, vb) in zip(t.history, plain.history, strict=True):
        for k in ("loss/generator", "loss/generator_gan", "loss/fake_score", "loss/discriminator"):
            assert va[k] == vb[k], k
    monkeypatch.setattr(trainer_mod, "stackable", lambda a, b: False)
    with pytest.raises(RuntimeError, match="set deepspeed.leaf_blocks=false"):
        t.generator_forward(t.data.next())
