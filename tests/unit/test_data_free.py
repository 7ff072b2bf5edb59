"""Data-free mode (DMD2 backward simulation): the trajectory matches the few-step sampler."""
import pytest
import torch

from megadmd.config import resolve
from megadmd.dmd.trainer import PHASE_GENERATOR
from megadmd.models import predict_velocity
from megadmd.rng import Purpose
from megadmd.runner import build_trainer
from megadmd.sampling import sample_generator
from tests.helpers import TEST_LATENT_SHAPE, save_test_dataset


@pytest.mark.parametrize("train_first_step", [True, False])
def test_exit_k_equals_the_k_step_sampler_run_by_hand(tmp_path, test_model_dir, single_process_world,
                                                      train_first_step):
    data = save_test_dataset(tmp_path / "text", num_samples=8, text_only=True)
    t = build_trainer(resolve(overrides=[
        f"model.teacher_path={test_model_dir}", f"data.path={data}", f"output_dir={tmp_path / 'out'}",
        "logging.tensorboard=false", "dmd.simulate_generator_forward=true", "train.micro_batch_size=2",
        f"data.latent_shape={TEST_LATENT_SHAPE}", f"dmd.train_first_step={str(train_first_step).lower()}"]))
    gen = t.models.generator.module
    seen = set()
    for _ in range(12):
        batch = t.data.next()
        assert batch.latents is None  # text embeddings only
        pos = batch.positions.tolist()
        with torch.no_grad():
            x0 = t.generator_x0(gen, batch, PHASE_GENERATOR)
        exits = t.exit_indices(batch, PHASE_GENERATOR).tolist()
        assert len(set(exits)) == 1  # one exit step per micro-batch, the same on every rank
        for j, (p, k) in enumerate(zip(pos, exits)):
            seen.add(k)
            text = batch.text_embeds[j:j + 1]
            vfn = lambda x, tt: predict_velocity(gen, x, tt, text, torch.float32)  # noqa: E731
            start = t.rng.randn([p], TEST_LATENT_SHAPE, Purpose.SIM_START, PHASE_GENERATOR)
            renoise = lambda i: t.rng.randn([p], TEST_LATENT_SHAPE, Purpose.SIM_RENOISE,  # noqa: E731
                                            PHASE_GENERATOR, sub=i)
            with torch.no_grad():
                by_hand = sample_generator(vfn, t.steps[:k + 1], start, renoise)
            assert torch.allclose(x0[j:j + 1], by_hand, atol=1e-5), (k, float((x0[j] - by_hand).abs().max()))
    # without the first step, the simulation always continues past the pure-noise step
    assert seen == ({0, 1, 2} if train_first_step else {1, 2})

