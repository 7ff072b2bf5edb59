"""The label-free sample statistics that validation logs: diversity and x0 saturation."""
import math

import pytest
import torch

from megadmd.monitoring.diversity import grouped_diversity, pairwise_diversity, x0_stats


def test_pairwise_diversity_by_hand():
    # prompt 0: three samples of 4 elements, pairwise RMS distances 1, 2 and 1; prompt 1: identical samples
    a = torch.zeros(4)
    b = torch.ones(4)  # rms(a, b) = 1
    c = torch.tensor([2.0, 2.0, 2.0, 2.0])  # rms(a, c) = 2, rms(b, c) = 1
    p1 = torch.stack([a, a, a])  # identical samples: diversity 0
    d = pairwise_diversity(torch.stack([torch.stack([a, b, c]), p1]))
    assert d == pytest.approx(((1 + 2 + 1) / 3 + 0) / 2)
    # any shape per sample; RMS over all of its elements
    x = torch.stack([torch.zeros(2, 3), torch.full((2, 3), 3.0)]).unsqueeze(0)
    assert pairwise_diversity(x) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="R >= 2"):
        pairwise_diversity(torch.zeros(2, 1, 4))


def test_grouped_diversity_skips_single_samples_and_averages_groups():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [7.0, 7.0]])
    groups = torch.tensor([0, 0, 1, 2])  # only group 0 has a pair: rms([3, 4]) = sqrt(12.5)
    assert grouped_diversity(x, groups) == pytest.approx(math.sqrt(12.5))
    with pytest.raises(ValueError):
        grouped_diversity(x, torch.arange(4))


def test_x0_stats_by_hand():
    x = torch.tensor([1.0, -1.0, 4.0, -4.0])
    s = x0_stats(x, extreme=3.0)
    assert s["abs_mean"] == pytest.approx(2.5)
    assert s["extreme_share"] == pytest.approx(0.5)
    assert s["std"] == pytest.approx(torch.tensor([1.0, -1.0, 4.0, -4.0]).std().item())
