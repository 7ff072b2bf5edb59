"""The built-in preset's regression pairs: the shipped latents are what the toy teacher's ODE
gives now, and a run uses them only for the teacher and settings they were sampled with."""
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megadmd.config import resolve
from megadmd.data.format import LatentDataset
from megadmd.toy import builtin
from megadmd.toy.builtin import (TOY_PAIR_ODE_STEPS, TOY_PAIRS, builtin_teacher_dir, pair_recipe, sample_pair_latents,
                                 shipped_pairs_path, toy_pair_inputs, write_toy_pairs)

RESAMPLED = 8  # pairs re-sampled by the ODE here (pair i depends on i alone)


def _default_args():
    cfg = resolve()  # what `megadmd train` runs with no arguments
    d = cfg.dmd
    return dict(num_samples=TOY_PAIRS, ode_steps=TOY_PAIR_ODE_STEPS, guidance_scale=d.guidance_scale,
                cfg_form=d.cfg_form, flow_shift=d.flow_shift, seed=cfg.train.seed)


def _shipped():
    with safe_open(str(shipped_pairs_path()), framework="pt") as f:
        return f.get_tensor("latents"), f.metadata()


def test_shipped_latents_are_the_teachers_ode_for_the_default_run():
    latents, metadata = _shipped()
    args = _default_args()
    assert metadata == pair_recipe(builtin_teacher_dir(), **args), (
        "the shipped pairs no longer match the tiny preset or its teacher: run python tools/toy_pairs_asset.py --overwrite")
    assert latents.shape == (TOY_PAIRS, 4, 4, 8, 8)
    fresh = sample_pair_latents(builtin_teacher_dir(), **dict(args, num_samples=RESAMPLED))
    # the ODE's own float noise (batch size, threads) only: 16 steps of an fp32 model
    torch.testing.assert_close(fresh, latents[:RESAMPLED], rtol=0, atol=1e-5)


@pytest.fixture
def no_ode(monkeypatch):
    """Replaces the ODE by a marker: a run that samples gets latents of 7s and a record."""
    calls = []

    def fake(teacher_dir, num_samples, *rest, **kw):
        calls.append(str(teacher_dir))
        return torch.full((num_samples, 4, 4, 8, 8), 7.0)
    monkeypatch.setattr(builtin, "sample_pair_latents", fake)
    return calls


def test_a_run_takes_the_shipped_latents_for_their_recipe_and_the_teacher_by_content(tmp_path, no_ode):
    args = _default_args()
    copy = tmp_path / "teacher_copy"
    shutil.copytree(builtin_teacher_dir(), copy)
    for i, teacher in enumerate([builtin_teacher_dir(), copy]):
        ds = LatentDataset(write_toy_pairs(tmp_path / f"pairs{i}", teacher, **args))
        assert len(ds) == TOY_PAIRS and ds.info.has_noise
        _, _, _, noise = toy_pair_inputs(TOY_PAIRS, args["seed"])
        for j in (0, 5, TOY_PAIRS - 1):
            item = ds.get(j)
            assert torch.equal(item["latents"], _shipped()[0][j])
            assert torch.equal(item["noise"], noise[j])
    assert no_ode == []


@pytest.mark.parametrize("change", ["flow_shift", "ode_steps", "seed", "num_samples", "teacher_config"])
def test_any_other_recipe_samples_the_ode(tmp_path, no_ode, change):
    args = _default_args()
    teacher = builtin_teacher_dir()
    if change == "teacher_config":
        teacher = tmp_path / "teacher"
        shutil.copytree(builtin_teacher_dir(), teacher)
        (teacher / "config.json").write_text((teacher / "config.json").read_text() + "\n")
    elif change == "num_samples":
        args["num_samples"] = 16
    else:
        args[change] = args[change] + 1
    ds = LatentDataset(write_toy_pairs(tmp_path / "pairs", teacher, **args))
    assert no_ode == [str(teacher)]
    assert torch.equal(ds.get(0)["latents"], torch.full((4, 4, 8, 8), 7.0))


def test_the_tool_writes_the_recipe_with_the_latents_and_keeps_an_existing_file(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import toy_pairs_asset

    monkeypatch.setattr(toy_pairs_asset, "sample_pair_latents", lambda *a, **k: torch.full((3, 2), 5.0))
    out = tmp_path / "pairs.safetensors"
    monkeypatch.setattr(sys, "argv", ["toy_pairs_asset.py", "-o", str(out)])
    toy_pairs_asset.main()
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == pair_recipe(builtin_teacher_dir(), **_default_args())
        assert torch.equal(f.get_tensor("latents"), torch.full((3, 2), 5.0))
    before = out.read_bytes()
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        toy_pairs_asset.main()
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["pairs.safetensors"]
