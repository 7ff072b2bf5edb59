"""Activation checkpointing recomputes blocks in backward and changes no gradient."""
import torch

from megadmd.config import resolve
from megadmd.runner import build_trainer
from megadmd.zero import full_state_dict


def _one_iteration_of_each_update(tmp_path, model_dir, data_dir, checkpointing: bool):
    flag = str(checkpointing).lower()
    t = build_trainer(resolve(overrides=[
        f"model.teacher_path={model_dir}", f"data.path={data_dir}", f"output_dir={tmp_path / flag}",
        "logging.tensorboard=false", "train.micro_batch_size=2", "optim.generator.lr=1e-3",
        "optim.fake_score.lr=1e-3", f"model.activation_checkpointing.generator={flag}",
        f"model.activation_checkpointing.fake_score={flag}"]))
    assert t.models.generator.module.gradient_checkpointing is checkpointing
    t.train_step(5)  # both updates
    t.train_step(6)
    values = t.window.reduce()
    return values, {r: full_state_dict(t.models.engine(r).module) for r in ("generator", "fake_score")}


def test_identical_gradients_with_and_without_checkpointing(tmp_path, test_model_dir, test_dataset_dir,
                                                            single_process_world):
    off_values, off = _one_iteration_of_each_update(tmp_path, test_model_dir, test_dataset_dir, False)
    on_values, on = _one_iteration_of_each_update(tmp_path, test_model_dir, test_dataset_dir, True)
    for k in ("grad_norm/generator", "grad_norm/fake_score", "loss/generator", "loss/fake_score"):
        assert on_values[k] == off_values[k], k  # bitwise: the recompute is the same computation
    for role in off:
        for k in off[role]:
            assert torch.equal(on[role][k], off[role][k]), (role, k)
