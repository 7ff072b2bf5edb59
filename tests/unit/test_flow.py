"""Flow-matching formulas against values derived by hand."""
import math

import pytest
import torch

from megadmd import flow


def test_add_noise_and_x0_round_trip_by_hand():
    x0 = torch.tensor([[2.0, -4.0]])
    eps = torch.tensor([[-1.0, 0.0]])
    sigma = torch.tensor([0.25])
    x_t = flow.add_noise(x0, eps, sigma)
    # (1 - 0.25) * 2 + 0.25 * (-1) = 1.25 ; 0.75 * (-4) + 0 = -3
    assert torch.equal(x_t, torch.tensor([[1.25, -3.0]]))
    v = flow.velocity_target(x0, eps)  # eps - x0
    assert torch.equal(v, torch.tensor([[-3.0, 4.0]]))
    # x0 = x_t - sigma * v = 1.25 + 0.75 = 2 ; -3 - 1 = -4
    assert torch.equal(flow.x0_from_velocity(x_t, v, sigma), x0)


def test_per_sample_sigma_broadcasts_over_a_video_latent():
    x0 = torch.zeros(2, 3, 2, 2, 2)
    eps = torch.ones(2, 3, 2, 2, 2)
    x_t = flow.add_noise(x0, eps, torch.tensor([0.1, 0.9]))
    assert torch.allclose(x_t[0], torch.full_like(x_t[0], 0.1))
    assert torch.allclose(x_t[1], torch.full_like(x_t[1], 0.9))


def test_sigma_is_t_over_1000():
    assert torch.allclose(flow.sigma_from_t(torch.tensor([1000.0, 757.0, 0.0])),
                          torch.tensor([1.0, 0.757, 0.0]))


def test_shift_by_hand():
    # s * sigma / (1 + (s - 1) * sigma)
    assert flow.shift_sigma(torch.tensor(0.5), 3.0).item() == pytest.approx(1.5 / 2.0)
    assert flow.shift_sigma(torch.tensor(0.757), 8.0).item() == pytest.approx(6.056 / 6.299, rel=1e-6)
    s = torch.linspace(0, 1, 11)
    assert torch.allclose(flow.shift_sigma(s, 1.0), s)
    assert flow.shift_sigma(torch.tensor(0.0), 8.0).item() == 0.0
    assert flow.shift_sigma(torch.tensor(1.0), 8.0).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        flow.shift_sigma(torch.tensor(0.5), 0.0)


def test_score_timesteps_are_shifted_then_clamped():
    u = torch.tensor([0.0, 0.5, 0.999])
    t = flow.sample_score_timesteps(u, shift=3.0, min_ratio=0.02, max_ratio=0.98)
    # 0 -> clamped up to 20 ; 0.5 -> 750 ; 0.999 -> 999.67 -> clamped down to 980
    assert torch.allclose(t, torch.tensor([20.0, 750.0, 980.0]))


def test_warp_denoising_steps_by_hand():
    warped = flow.warp_steps([1000, 757, 522], 8.0)
    assert warped[0] == pytest.approx(1000.0)
    assert warped[1] == pytest.approx(1000 * 6.056 / 6.299)  # about 961
    assert warped[2] == pytest.approx(1000 * 4.176 / 4.654)  # about 897
    assert flow.warp_steps([757], 1.0) == [pytest.approx(757.0)]


def test_euler_sigmas_by_hand():
    assert flow.euler_sigmas(2, 1.0) == [1.0, 0.5, 0.0]
    assert flow.euler_sigmas(2, 3.0) == [1.0, pytest.approx(0.75), 0.0]
    assert len(flow.euler_sigmas(50, 8.0)) == 51


def test_euler_on_a_straight_flow_is_exact():
    # For a point mass at x0 = 3, the ideal velocity at x_t is (x_t - x0) / sigma = eps - x0;
    # Euler along it reaches x0 exactly in any number of steps.
    x0 = torch.tensor([3.0])
    x = torch.tensor([0.5])  # pure noise at sigma = 1
    sig = flow.euler_sigmas(3, 2.0)
    for i in range(3):
        v = (x - x0) / sig[i]
        x = flow.euler_step(x, v, sig[i], sig[i + 1])
    assert torch.allclose(x, x0)
    assert not math.isnan(float(x))
