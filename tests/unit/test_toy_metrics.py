"""Toy-distribution metrics and the sample grid against values derived by hand."""
import math

import pytest
import torch

from megadmd.toy import metrics
from megadmd.toy.distribution import ToySpec, modes, sample
from megadmd.toy.render import latent_tile, render_grid

SPEC = ToySpec()
K, M = SPEC.num_classes, SPEC.modes_per_class


def _at_modes(mode_of_each: list[int], repeats: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples exactly at mode ``mode_of_each[i]`` of every class, ``repeats`` times each."""
    table = modes(SPEC)
    labels = torch.arange(K).repeat_interleave(len(mode_of_each) * repeats)
    idx = torch.tensor(mode_of_each).repeat_interleave(repeats).repeat(K)
    return table[labels, idx], labels


def test_samples_on_every_mode_score_perfectly():
    x, labels = _at_modes([0, 1, 2], repeats=5)
    r = metrics.evaluate(x, labels, SPEC)
    assert r["precision"] == 1.0
    assert r["coverage"] == 1.0
    assert r["entropy"] == pytest.approx(1.0)  # an even spread over the M modes
    assert r["nearest_rms"] == pytest.approx(0.0, abs=1e-6)


def test_samples_on_one_mode_cover_one_mode_per_class_with_zero_entropy():
    x, labels = _at_modes([1], repeats=7)
    r = metrics.evaluate(x, labels, SPEC)
    assert r["precision"] == 1.0
    assert r["coverage"] == pytest.approx(1 / M)
    assert r["entropy"] == pytest.approx(0.0)
    shares = metrics.mode_hit_shares(metrics.rms_to_modes(x, labels, SPEC), labels, K)
    assert torch.equal(shares, torch.tensor([[0.0, 1.0, 0.0]] * K, dtype=torch.float64))


def test_entropy_of_an_uneven_spread_by_hand():
    x, labels = _at_modes([0, 0, 1, 2])  # per class counts 2, 1, 1 -> p = 1/2, 1/4, 1/4
    expected = (0.5 * math.log(2) + 2 * 0.25 * math.log(4)) / math.log(3)
    assert metrics.evaluate(x, labels, SPEC)["entropy"] == pytest.approx(expected)


def test_samples_of_the_wrong_class_or_far_away_miss():
    table = modes(SPEC)
    labels = torch.arange(K)
    far = torch.zeros(K, *SPEC.latent_shape)  # 1 RMS from every unit-RMS mode
    assert metrics.evaluate(far, labels, SPEC)["precision"] == 0.0
    assert metrics.evaluate(far, labels, SPEC)["coverage"] == 0.0
    wrong = table[(labels + 1) % K, 0]  # a true mode, but of another class
    assert metrics.evaluate(wrong, labels, SPEC)["precision"] == 0.0


def test_hit_radius_is_an_rms_distance():
    table = modes(SPEC)
    labels = torch.zeros(3, dtype=torch.long)
    # mode + c everywhere is exactly c away in RMS
    x = table[0, 0] + torch.tensor([0.05, 0.29, 0.31]).view(3, 1, 1, 1, 1)
    dist = metrics.rms_to_modes(x, labels, SPEC)
    assert torch.allclose(dist[:, 0], torch.tensor([0.05, 0.29, 0.31], dtype=torch.float64))
    assert metrics.precision(dist) == pytest.approx(2 / 3)
    assert metrics.precision(dist, radius=0.04) == 0.0


def test_a_mode_counts_as_covered_from_one_percent_of_its_class():
    table = modes(SPEC)

    def coverage_with(num_on_mode_2: int) -> float:
        labels = torch.zeros(200, dtype=torch.long)
        idx = torch.zeros(200, dtype=torch.long)
        idx[:100] = 1
        idx[100:100 + num_on_mode_2] = 2
        dist = metrics.rms_to_modes(table[0, idx], labels, SPEC)
        return metrics.coverage(dist, labels, K)

    # class 0 covers modes 0 and 1 (classes 1-3 have no samples and cover nothing)
    assert coverage_with(1) == pytest.approx(2 / (K * M))  # 0.5% of the class
    assert coverage_with(2) == pytest.approx(3 / (K * M))  # 1%


def test_frechet_distance_matches_the_closed_form():
    # 1-d: (mu1 - mu2)^2 + (s1 - s2)^2
    one = metrics.frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]),
                                   torch.tensor([-2.0]), torch.tensor([[9.0]]))
    assert one == pytest.approx(9.0 + 1.0)
    # 2-d, non-commuting covariances: for 2x2 PSD M, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)),
    # with tr(A^1/2 B A^1/2) = tr(AB) and det = det A det B.
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -0.3], [-0.3, 3.0]], dtype=torch.float64)
    mu1, mu2 = torch.tensor([0.5, -1.0]), torch.tensor([0.0, 1.0])
    cross = math.sqrt(float((a @ b).trace()) + 2 * math.sqrt(float(a.det() * b.det())))
    expected = 0.25 + 4.0 + float(a.trace() + b.trace()) - 2 * cross
    assert metrics.frechet_distance(mu1, a, mu2, b) == pytest.approx(expected, rel=1e-9)
    assert metrics.frechet_distance(mu1, a, mu2, b) == pytest.approx(
        metrics.frechet_distance(mu2, b, mu1, a), rel=1e-9)
    # a rank-deficient covariance is fine: a point mass against a Gaussian
    assert metrics.frechet_distance(mu1, torch.zeros(2, 2), mu1, a) == pytest.approx(3.0)


def test_frechet_projection_is_fixed_and_orthonormal():
    p = metrics.fd_projection(SPEC, 16)
    assert p.shape == (math.prod(SPEC.latent_shape), 16)
    assert torch.allclose(p.T @ p, torch.eye(16, dtype=torch.float64), atol=1e-12)
    assert torch.equal(p, metrics.fd_projection(SPEC, 16))


def test_frechet_of_noise_free_samples_is_the_missing_noise_variance():
    # Exact modes, evenly spread: the means match and the mode covariance matches (up to n/(n-1)),
    # so only the noise variance s^2 is missing, in the d - (M - 1) directions outside the modes'
    # span: about (d - M + 1) / d * s^2 per element.
    x, labels = _at_modes([0, 1, 2], repeats=100)
    d = metrics.DEFAULT_FD_DIMS
    expected = (d - M + 1) / d * SPEC.noise_std ** 2
    assert metrics.evaluate(x, labels, SPEC)["frechet"] == pytest.approx(expected, rel=0.02)


def test_true_samples_sit_at_a_small_frechet_floor_and_mode_dropping_does_not():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(512 * K) % K
    x, mode_idx = sample(SPEC, labels, g)
    r = metrics.evaluate(x, labels, SPEC)
    assert r["precision"] == 1.0 and r["coverage"] == 1.0
    assert r["entropy"] > 0.99
    assert r["nearest_rms"] == pytest.approx(SPEC.noise_std, rel=0.01)
    assert r["frechet"] < 0.005
    keep = mode_idx != 2  # drop one mode per class
    dropped = metrics.evaluate(x[keep], labels[keep], SPEC)
    assert dropped["coverage"] == pytest.approx(2 / 3)
    assert dropped["frechet"] > 20 * r["frechet"]


def test_evaluate_rejects_a_wrong_latent_shape():
    with pytest.raises(ValueError, match="shape"):
        metrics.evaluate(torch.zeros(2, 4, 4, 8, 7), torch.zeros(2, dtype=torch.long), SPEC)


def test_render_grid_lays_out_modes_then_samples():
    table = modes(SPEC)
    labels = torch.tensor([0, 1, 1, 3])
    samples = torch.stack([table[2, 0], table[0, 1], table[0, 2], -table[3, 0]])
    img = render_grid(samples, labels, SPEC, per_class=2, scale=1)
    c, f, h, w = SPEC.latent_shape
    tile_w = f * (w + 1) - 1
    assert img.dtype == torch.uint8
    assert img.shape == (3, K * (h + 2) + 2, (M + 2) * (tile_w + 2) + 2 + 8)
    # the first tile of row 0 is mode 0 of class 0; the first sample tile of row 1 is sample 1
    expected = (latent_tile(table[0, 0]) * 255).round().to(torch.uint8)
    assert torch.equal(img[:, 2:2 + h, 2:2 + tile_w], expected)
    x1 = 2 + M * (tile_w + 2) + 8
    y1 = 2 + (h + 2)
    expected = (latent_tile(samples[1]) * 255).round().to(torch.uint8)
    assert torch.equal(img[:, y1:y1 + h, x1:x1 + tile_w], expected)
    # class 2 has no samples: its sample tiles stay blank
    y2 = 2 + 2 * (h + 2)
    assert int(img[:, y2:y2 + h, x1:].max()) == 0
    assert render_grid(samples, labels, SPEC, per_class=2, scale=3).shape[1:] == (
        3 * img.shape[1], 3 * img.shape[2])


def test_quality_hook_scores_the_ema_weights_under_their_own_tag():
    """With a started EMA the hook samples twice: the live weights under quality/, the EMA's under
    quality_ema/, and the EMA scores are those of the weights the EMA swapped in."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from megadmd.models import load_wan
    from megadmd.toy.builtin import TOY_SPEC, builtin_teacher_dir
    from megadmd.toy.quality import ToyQuality, eval_inputs, score
    from megadmd.toy.quality import sample as toy_sample

    module = load_wan(str(builtin_teacher_dir())).eval()
    live = {k: v.clone() for k, v in module.state_dict().items()}
    swapped = {k: v * 0.9 for k, v in live.items()}  # stands in for the EMA weights

    @contextmanager
    def applied():
        module.load_state_dict(swapped)
        try:
            yield
        finally:
            module.load_state_dict(live)

    logged = {}
    writer = SimpleNamespace(scalars=lambda d, step: logged.update({(k, step): v for k, v in d.items()}),
                             image=lambda tag, img, step, caption=None: logged.update({(tag, step): img.shape}))
    trainer = SimpleNamespace(models=SimpleNamespace(generator=SimpleNamespace(module=module), dtype=torch.float32),
                              ema=SimpleNamespace(started=True, applied=applied), writer=writer,
                              state=SimpleNamespace(step=5), pstate=SimpleNamespace(rank=0),
                              device=torch.device("cpu"))
    hook = ToyQuality(TOY_SPEC, interval_steps=5, per_class=4, seed=3)
    scores = hook.run(trainer)

    labels, noise, renoise = eval_inputs(TOY_SPEC, 4, 3, torch.device("cpu"))

    def expected(state):
        module.load_state_dict(state)
        return score(toy_sample(module, "student", TOY_SPEC, labels, noise, renoise), labels, TOY_SPEC)

    want_ema, want_live = expected(swapped), expected(live)
    assert scores == want_live and hook.history == [(5, want_live)]
    assert hook.ema_history == [(5, want_ema)] and want_ema != want_live
    assert logged[("quality/precision", 5)] == want_live["precision"]
    assert logged[("quality/diversity", 5)] == want_live["diversity"]
    assert logged[("quality_ema/nearest_rms", 5)] == want_ema["nearest_rms"]
    assert ("quality_ema/samples", 5) in logged and ("quality/samples", 5) in logged


def test_the_quality_hook_samples_the_runs_own_student_schedule():
    """A run with its own dmd.denoising_steps is scored on them, not on the preset's default:
    two steps (1000, 400) by hand, x0 = x - sigma v and x = (1 - s) x0 + s eps in between."""
    from types import SimpleNamespace

    from megadmd.models import load_wan
    from megadmd.toy.builtin import TOY_SPEC, builtin_teacher_dir
    from megadmd.toy.distribution import class_embeddings
    from megadmd.toy.quality import ToyQuality, eval_inputs, score

    module = load_wan(str(builtin_teacher_dir())).eval()
    writer = SimpleNamespace(scalars=lambda d, step: None, image=lambda tag, img, step, caption=None: None)
    trainer = SimpleNamespace(models=SimpleNamespace(generator=SimpleNamespace(module=module), dtype=torch.float32),
                              ema=None, writer=writer, state=SimpleNamespace(step=1),
                              pstate=SimpleNamespace(rank=0), device=torch.device("cpu"))
    scores = ToyQuality(TOY_SPEC, interval_steps=5, per_class=2, seed=3, student_steps=[1000, 400]).run(trainer)

    labels, noise, renoise = eval_inputs(TOY_SPEC, 2, 3, torch.device("cpu"), num_steps=2)
    text = class_embeddings(TOY_SPEC)[labels]

    def v(x, t):
        with torch.no_grad():
            return module(x, torch.full((x.shape[0],), t), text, return_dict=False)[0]

    x0 = noise - 1.0 * v(noise, 1000.0)
    x = 0.6 * x0 + 0.4 * renoise[0]
    x0 = x - 0.4 * v(x, 400.0)
    assert scores == score(x0, labels, TOY_SPEC)
