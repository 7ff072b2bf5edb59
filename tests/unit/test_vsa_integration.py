"""VSA inside megadmd: gates, the sparsity ramp, and who uses sparse attention."""
import copy

import pytest
import torch

from megadmd.attention.processor import GATE_ATTR, VSASettings, configure_attention, vsa_sparsity_at
from megadmd.config import resolve
from megadmd.models import attach_vsa_gates, build_wan, load_wan
from megadmd.runner import build_trainer
from megadmd.zero import full_state_dict
from tests.helpers import TEST_WAN_CONFIG, save_test_dataset


def test_sparsity_ramp_by_hand():
    assert vsa_sparsity_at(7, 0.8, 0.0, 1) == 0.8  # constant from the start
    ramp = [vsa_sparsity_at(s, 0.9, 0.03, 50) for s in (0, 49, 50, 149, 1500, 10_000)]
    assert ramp == pytest.approx([0.0, 0.0, 0.03, 0.06, 0.9, 0.9])


def _inputs(grid=(4, 8, 8)):
    g = torch.Generator().manual_seed(0)
    f, h, w = grid
    return (torch.randn(2, 4, f, 2 * h, 2 * w, generator=g), torch.tensor([300.0, 800.0]),
            torch.randn(2, 6, 32, generator=g))


def test_zero_gates_at_sparsity_zero_keep_a_dense_checkpoint_exactly(tmp_path):
    dense = build_wan(TEST_WAN_CONFIG, seed=0)
    dense.save_pretrained(str(tmp_path / "dense"))
    sparse = load_wan(tmp_path / "dense")
    assert attach_vsa_gates(sparse, tmp_path / "dense") == 0  # none in the checkpoint: zeros
    configure_attention(sparse, vsa=VSASettings(sparsity=0.0, backend="torch"))
    x, t, text = _inputs()
    assert torch.allclose(sparse(x, t, text, return_dict=False)[0], dense(x, t, text, return_dict=False)[0],
                          atol=1e-5)


def test_gates_are_saved_and_loaded_with_the_model(tmp_path):
    m = build_wan(TEST_WAN_CONFIG, seed=0)
    attach_vsa_gates(m, _save(m, tmp_path / "a"))
    with torch.no_grad():
        for block in m.blocks:
            getattr(block.attn1, GATE_ATTR).weight.normal_()
    m.save_pretrained(str(tmp_path / "b"))
    again = load_wan(tmp_path / "b")  # diffusers ignores the extra keys...
    assert attach_vsa_gates(again, tmp_path / "b") == len(m.blocks)  # ...and we put them back
    for a, b in zip(m.blocks, again.blocks):
        assert torch.equal(getattr(a.attn1, GATE_ATTR).weight, getattr(b.attn1, GATE_ATTR).weight)


def _save(model, path):
    copy.deepcopy(model).save_pretrained(str(path))
    return path


def test_only_the_generator_is_sparse_and_its_gates_train(tmp_path, test_model_dir, single_process_world):
    data = save_test_dataset(tmp_path / "data", num_samples=4, latent_shape=[4, 4, 16, 16])  # 4x8x8 grid
    t = build_trainer(resolve(overrides=[
        f"model.teacher_path={test_model_dir}", f"data.path={data}", f"output_dir={tmp_path / 'out'}",
        "logging.tensorboard=false", "attention.vsa_sparsity=0.5", "attention.vsa_backend=torch",
        "optim.generator.lr=1e-2"]))
    m = t.models
    assert all(b.attn1.processor.vsa is t.vsa for b in m.generator.module.blocks)
    for role in ("teacher", "fake_score"):
        assert all(b.attn1.processor.vsa is None for b in m.engine(role).module.blocks)
        assert not any(GATE_ATTR in n for n, _ in m.engine(role).module.named_parameters())
    t.train_step(5)  # a generator iteration
    assert t.vsa.sparsity == 0.5
    gates = {k: v for k, v in full_state_dict(m.generator.module).items() if GATE_ATTR in k}
    assert gates and any(v.abs().sum() > 0 for v in gates.values())  # trained away from zero


def test_current_sparsity_is_logged_to_tensorboard(tmp_path, test_model_dir, single_process_world):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = save_test_dataset(tmp_path / "data", num_samples=4, latent_shape=[4, 4, 16, 16])
    t = build_trainer(resolve(overrides=[
        f"model.teacher_path={test_model_dir}", f"data.path={data}", f"output_dir={tmp_path / 'out'}",
        "attention.vsa_sparsity=0.6", "attention.vsa_decay_rate=0.2", "attention.vsa_decay_interval_steps=2",
        "attention.vsa_backend=torch", "logging.interval_steps=1", "train.max_steps=3",
        "checkpoint.interval_steps=0", "validation.interval_steps=0"]))
    t.train()
    t.writer.close()
    acc = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    acc.Reload()
    got = {e.step: e.value for e in acc.Scalars("attention/vsa_sparsity")}
    want = {s: vsa_sparsity_at(s, 0.6, 0.2, 2) for s in (1, 2, 3)}  # 0, 0.2, 0.2
    assert got.keys() == want.keys() and len(set(want.values())) > 1  # a ramp, not a constant
    assert all(abs(got[s] - want[s]) < 1e-6 for s in want), (got, want)
