"""Per-sample randomness: keyed by stream position and purpose, independent of the layout."""
import torch

from megadmd.rng import Purpose, SampleRNG, sample_seed


def test_same_position_same_draw_regardless_of_batch():
    r = SampleRNG(7)
    both = r.randn([4, 5], (3,), Purpose.DMD_NOISE)
    assert torch.equal(both[1], r.randn([5], (3,), Purpose.DMD_NOISE)[0])
    assert torch.equal(r.rand([4, 5], Purpose.DMD_TIMESTEP)[0], r.rand([4], Purpose.DMD_TIMESTEP)[0])


def test_purpose_phase_and_sub_give_independent_streams():
    seeds = {sample_seed(1, 10, p, ph, s) for p in (1, 2) for ph in (0, 1) for s in (0, 1)}
    assert len(seeds) == 8
    r = SampleRNG(1)
    assert not torch.equal(r.randn([0], (4,), Purpose.GEN_NOISE), r.randn([0], (4,), Purpose.DMD_NOISE))


def test_randint_range():
    r = SampleRNG(0)
    v = r.randint(list(range(200)), 3, Purpose.GEN_STEP_INDEX)
    assert v.min() == 0 and v.max() == 2
