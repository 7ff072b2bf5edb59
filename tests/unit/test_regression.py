"""DMD v1's regression on teacher ODE pairs: the loss by hand, the trainer's deterministic chain
from the stored noise, and the checks of where the pairs come from."""
import pytest
import torch

from megadmd.config import ConfigError, resolve
from megadmd.dmd import regression
from megadmd.rng import Purpose
from tests.helpers import TEST_LATENT_SHAPE, save_test_dataset


def test_regression_loss_by_hand():
    # v(x, t) = a x, so the x0 of a step at sigma s is (1 - s a) x
    a = 0.5
    vfn = lambda x, t: a * x  # noqa: E731
    z = torch.tensor([[2.0, -1.0]])
    r = torch.tensor([[1.0, 3.0]])
    y = torch.tensor([[0.0, 1.0]])
    x0 = regression.chain_x0(vfn, [1000, 500], z, lambda i: r)
    # step 1 at sigma 1: x0 = 0.5 z = [1, -0.5]; re-noised to 0.5: 0.5 [1, -0.5] + 0.5 [1, 3] = [1, 1.25]
    # step 2 at sigma 0.5: x0 = 0.75 [1, 1.25] = [0.75, 0.9375]
    assert torch.allclose(x0, torch.tensor([[0.75, 0.9375]]))
    loss = regression.regression_loss(x0, y)
    assert loss.item() == pytest.approx((0.75 ** 2 + 0.0625 ** 2) / 2)
    # the gradient reaches both steps: d loss / d a through the whole chain
    a_t = torch.tensor(a, requires_grad=True)
    x0 = regression.chain_x0(lambda x, t: a_t * x, [1000, 500], z, lambda i: r)
    regression.regression_loss(x0, y).backward()
    # x0 = (1 - a/2) (0.5 (1 - a) z + 0.5 r); d/da at a = 0.5, by hand per element, then the MSE's chain rule
    dx0 = -0.5 * (0.5 * (1 - a) * z + 0.5 * r) + (1 - a / 2) * (-0.5 * z)
    expected = (2 * (torch.tensor([[0.75, 0.9375]]) - y) * dx0).mean()
    assert a_t.grad.item() == pytest.approx(expected.item())


def _pairs_dataset(path, n=8):
    """A dataset whose shards also hold each latent's starting noise."""
    return save_test_dataset(path, num_samples=n, with_noise=True)


@pytest.fixture
def pairs_trainer(tmp_path, test_model_dir, single_process_world):
    from megadmd.runner import build_trainer

    data = _pairs_dataset(tmp_path / "pairs")
    cfg = resolve(overrides=[f"model.teacher_path={test_model_dir}", f"data.path={data}",
                             f"output_dir={tmp_path / 'out'}", "train.micro_batch_size=4", "logging.tensorboard=false",
                             "dmd.regression.weight=1.0", "dmd.regression.batch_size=6", "optim.generator.lr=1e-3"])
    return build_trainer(cfg)


def test_trainer_regression_is_the_chain_from_the_stored_noise_with_fixed_draws(pairs_trainer):
    from megadmd.models import predict_velocity
    from megadmd.sampling import sample_generator

    t = pairs_trainer
    batch = t.data.next()
    first = t.regression_loss(batch)
    assert torch.equal(first, t.regression_loss(batch))  # the same draws every time
    # the pairs of this micro-step: the regression stream's own micro-batch (here 6 pairs)
    pairs = t.regression_data.collate(t.regression_data.positions_for(batch.micro_step))
    assert pairs.noise is not None and pairs.size == 6
    # by hand: the bare generator, the dataset-index-keyed re-noising draws
    module = t.models.generator.module
    keys = pairs.indices.tolist()
    with torch.no_grad():
        x0 = sample_generator(lambda x, tt: predict_velocity(module, x, tt, pairs.text_embeds, torch.float32),
                              t.steps, pairs.noise,
                              lambda i: t.rng.randn(keys, TEST_LATENT_SHAPE, Purpose.REG_RENOISE, sub=i))
    assert first.item() == pytest.approx(torch.mean((x0 - pairs.latents) ** 2).item(), rel=1e-6)
    # one step: DMD v1's regression of the first step alone
    t.dmd.regression.num_steps = 1
    with torch.no_grad():
        v = predict_velocity(module, pairs.noise, torch.full((6,), 1000.0), pairs.text_embeds, torch.float32)
    one = torch.mean((pairs.noise - v - pairs.latents) ** 2)
    assert t.regression_loss(batch).item() == pytest.approx(one.item(), rel=1e-6)


def test_generator_step_with_regression_lowers_the_regression_loss(pairs_trainer):
    t = pairs_trainer
    batch = t.data.collate(t.data.positions_for(0))
    before = t.regression_loss(batch).item()
    for _ in range(3):
        t.generator_step([batch])
    values = t.window.reduce()
    assert "loss/generator_regression" in values and "loss/generator_dmd" in values
    assert t.regression_loss(batch).item() < before


def test_regression_needs_pairs(tmp_path, test_model_dir, test_dataset_dir):
    from megadmd.preflight import preflight_train

    base = [f"model.teacher_path={test_model_dir}", f"output_dir={tmp_path / 'o'}", "dmd.regression.weight=1"]
    with pytest.raises(ConfigError, match="holds no starting noise.*--save-noise"):
        preflight_train(resolve(overrides=[*base, f"data.path={test_dataset_dir}"]), 1)
    with pytest.raises(ConfigError, match="holds no starting noise"):
        preflight_train(resolve(overrides=[*base, f"data.path={test_dataset_dir}",
                                           f"dmd.regression.data_path={test_dataset_dir}"]), 1)
    pairs = _pairs_dataset(tmp_path / "pairs")
    plan = preflight_train(resolve(overrides=[*base, f"data.path={test_dataset_dir}",
                                              f"dmd.regression.data_path={pairs}"]), 1)
    assert plan.regression_path == str(pairs) and not plan.builtin_regression
    assert preflight_train(resolve(overrides=[*base, f"data.path={pairs}"]), 1).regression_path == str(pairs)
    # the built-in toy preset writes its pairs (the toy teacher's ODE) into the output folder at start-up
    plan = preflight_train(resolve(overrides=[f"output_dir={tmp_path / 'toy'}", "dmd.regression.weight=1"]), 1)
    assert plan.builtin_regression and plan.regression_path == str(tmp_path / "toy" / "regression_data")
    for bad in ("dmd.regression.weight=-1", "dmd.regression.num_steps=4", "dmd.regression.batch_size=-1"):
        with pytest.raises(ConfigError, match="dmd.regression"):
            resolve(overrides=[bad])
