"""DMD losses against values derived by hand."""
import pytest
import torch

from megadmd.dmd import losses


def test_cfg_forms_by_hand_and_their_equivalence():
    cond, uncond = torch.tensor([1.0]), torch.tensor([0.5])
    # offset: cond + s (cond - uncond) = 1 + 3.5 * 0.5
    assert losses.cfg_combine(cond, uncond, 3.5, "offset").item() == pytest.approx(2.75)
    # standard: uncond + s (cond - uncond) = 0.5 + 3.5 * 0.5
    assert losses.cfg_combine(cond, uncond, 3.5, "standard").item() == pytest.approx(2.25)
    # they agree when s_standard = s_offset + 1
    x, y = torch.randn(5), torch.randn(5)
    assert torch.allclose(losses.cfg_combine(x, y, 3.5, "offset"), losses.cfg_combine(x, y, 4.5, "standard"))
    # offset 0 is the conditional prediction, standard 0 the unconditional one
    assert torch.equal(losses.cfg_combine(x, y, 0.0, "offset"), x)
    assert torch.equal(losses.cfg_combine(x, y, 0.0, "standard"), y)
    with pytest.raises(ValueError):
        losses.cfg_combine(x, y, 1.0, "bogus")


def test_limit_guidance_keeps_the_guided_value_only_inside_the_interval():
    guided = torch.tensor([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [40.0, 40.0]])
    cond = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    t = torch.tensor([100.0, 500.0, 800.0, 1000.0])  # ratios 0.1, 0.5 (edge, inside), 0.8, 1.0
    got = losses.limit_guidance(guided, cond, t, [0.5, 0.8])
    assert got.tolist() == [[1.0, 1.0], [20.0, 20.0], [30.0, 30.0], [4.0, 4.0]]
    # the full interval is guidance everywhere, the same tensor back
    assert losses.limit_guidance(guided, cond, t, [0.0, 1.0]) is guided


X0_GEN = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
X0_REAL = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
X0_FAKE = torch.tensor([[1.0, 0.0], [1.0, 3.0]])


def test_normalized_grad_per_sample_by_hand():
    g = losses.dmd_grad(X0_GEN, X0_REAL, X0_FAKE, mean="sample")
    # sample 0: mean|1-0| = 1, (fake-real)/1 = [1, 0]; sample 1: mean|0-2| = 2, [-1, 1]/2
    assert torch.allclose(g, torch.tensor([[1.0, 0.0], [-0.5, 0.5]]))


def test_normalized_grad_batch_mean_by_hand():
    g = losses.dmd_grad(X0_GEN, X0_REAL, X0_FAKE, mean="batch")
    # one mean over the whole tensor: (1 + 1 + 2 + 2) / 4 = 1.5
    assert torch.allclose(g, torch.tensor([[1.0, 0.0], [-1.0, 1.0]]) / 1.5)


def test_batch_and_sample_means_agree_at_batch_size_one():
    a, b, c = torch.randn(3, 1, 4, 2, 3, 3)
    assert torch.allclose(losses.dmd_grad(a, b, c, "sample"), losses.dmd_grad(a, b, c, "batch"))


def test_normalized_grad_replaces_non_finite_values():
    x = torch.ones(1, 3)
    g = losses.dmd_grad(x, x, x + 1, mean="sample")  # denominator 0 -> inf -> nan_to_num
    assert torch.isfinite(g).all()
    g0 = losses.dmd_grad(x, x, x, mean="sample")  # 0 / 0 -> nan -> 0
    assert torch.equal(g0, torch.zeros_like(x))


def test_dmd_loss_gradient_is_grad_over_numel():
    x0_gen = torch.randn(2, 3, 2, 4, 4, requires_grad=True)
    grad = torch.randn(2, 3, 2, 4, 4)
    loss = losses.dmd_loss(x0_gen, grad)
    # its value: 0.5 * mean(grad^2)
    assert loss.item() == pytest.approx(0.5 * grad.pow(2).mean().item(), rel=1e-6)
    loss.backward()
    assert torch.allclose(x0_gen.grad, grad / grad.numel(), atol=1e-9)


def test_fake_score_loss_by_hand():
    v = torch.tensor([[2.0, 1.0]])
    eps = torch.tensor([[0.5, 0.5]])
    x0 = torch.tensor([[-0.5, -0.5]])
    # target eps - x0 = [1, 1]; squared errors [1, 0]; mean 0.5
    assert losses.fake_score_loss(v, eps, x0).item() == pytest.approx(0.5)


def test_real_score_only_x0_zeroes_the_fake_score():
    # score(x_t) = ((1 - sigma) x0_hat - x_t) / sigma^2 must vanish for the returned x0_hat
    x_t = torch.tensor([[0.6, -1.2]])
    sigma = torch.tensor([0.25])
    x0 = losses.real_score_only_x0(x_t, sigma)
    assert torch.allclose(x0, torch.tensor([[0.8, -1.6]]))
    assert torch.allclose((1 - 0.25) * x0 - x_t, torch.zeros(1, 2))
