"""Nothing a user made is lost: output folders are never replaced without --overwrite (and runs,
checkpoints and other commands' datasets never), one run per folder under a lock, no silent
restart, verified checkpoints, checked resumes, and a disk full during a save.

Commands run in this process (click's CliRunner) on copies of one finished tiny run; only the
lock held by another process and the two-rank refusal use subprocesses."""
import errno
import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import (TEST_LATENT_SHAPE, cli_env, error_lines, free_port, invoke_cli, save_test_model,
                           tree_digest)

CKPT2, CKPT4 = "step-00000002", "step-00000004"


@pytest.fixture
def run(trained_run, tmp_path):
    """A private copy of the finished run, and the overrides to continue it."""
    src, overrides = trained_run
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst, [f"output_dir={dst}", *overrides]


def _train(overrides, *extra):
    args = ["train"]
    for o in overrides:
        args += ["--set", o]
    return invoke_cli(*args, *extra)


def _refused(result, *words):
    """Exit status 2, exactly one error line holding ``words``, no traceback."""
    lines = error_lines(result)
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr, result.exception)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _flip_bits(path, offset=None):
    """Same size, other content: a few bytes in the middle of the file, inverted."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    for i in range(at, at + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _optim_file(ckpt):
    return next(ckpt.glob("generator/zero/*optim_states.pt"))


# --- output folders ------------------------------------------------------------------------------
def _writers(run, tmp_path, test_model_dir):
    """Each folder-writing command that needs no model loading, as ``lambda out, *flags: args``."""
    from safetensors.torch import save_file

    from megadmd.models import build_wan
    from tests.helpers import TEST_WAN_CONFIG

    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in build_wan(TEST_WAN_CONFIG, seed=1).state_dict().items()}, str(weights))
    ckpt = run / "checkpoints" / CKPT4
    return {
        "to-diffusers": lambda out, *f: ["convert", "to-diffusers", ckpt, "-o", out, *f],
        "export-ema": lambda out, *f: ["export-ema", ckpt, "-o", out, *f],
        "make-dataset": lambda out, *f: ["make-dataset", "-o", out, "-n", "3", "--latent-shape", "4,2,4,4",
                                         "--text-len", "4", "--text-dim", "32", *f],
        "init": lambda out, *f: ["convert", "init", weights, "--config", test_model_dir, "-o", out, *f],
    }


def test_writers_never_replace_a_run_or_a_user_folder_without_overwrite(run, tmp_path, test_model_dir):
    run_dir, _ = run
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("my notes\n")
    for name, args in _writers(run_dir, tmp_path, test_model_dir).items():
        for target, flags, words in ((run_dir, (), ["is a megadmd training run", "never deletes"]),
                                     (run_dir, ("--overwrite",), ["is a megadmd training run", "never deletes"]),
                                     (user, (), ["is not empty (notes.txt)", "--overwrite"])):
            before = tree_digest(target)
            _refused(invoke_cli(*args(target, *flags)), *words)
            assert tree_digest(target) == before, (name, target)


def test_overwrite_replaces_the_previous_output_but_never_a_foreign_dataset(run, tmp_path, test_model_dir):
    from megadmd.data.format import LatentDataset

    run_dir, _ = run
    writers = _writers(run_dir, tmp_path, test_model_dir)
    for name in ("to-diffusers", "make-dataset"):
        out = tmp_path / f"out-{name}"
        assert invoke_cli(*writers[name](out)).exit_code == 0
        (out / "stale.txt").write_text("left by hand\n")
        _refused(invoke_cli(*writers[name](out)), "--overwrite")
        r = invoke_cli(*writers[name](out, "--overwrite"))
        assert r.exit_code == 0, r.output
        assert not (out / "stale.txt").exists(), name  # replaced as a whole
    r = invoke_cli("make-dataset", "-o", tmp_path / "out-make-dataset", "-n", "5", "--latent-shape", "4,2,4,4",
                   "--text-len", "4", "--text-dim", "32", "--overwrite")
    assert r.exit_code == 0 and len(LatentDataset(tmp_path / "out-make-dataset")) == 5
    user = tmp_path / "mine"  # a folder of the user's files: replaced only because --overwrite says so
    user.mkdir()
    (user / "notes.txt").write_text("x")
    assert invoke_cli(*writers["init"](user, "--overwrite")).exit_code == 0 and not (user / "notes.txt").exists()
    toy = run_dir.parent / "toy"  # a dataset another command wrote (the toy data of a run)
    from megadmd.toy.builtin import write_toy_dataset

    write_toy_dataset(toy, 8)
    for name in ("make-dataset", "export-ema"):
        before = tree_digest(toy)
        _refused(invoke_cli(*writers[name](toy, "--overwrite")), "written by 'megadmd train'", "never deletes")
        assert tree_digest(toy) == before
    parent = tmp_path / "runs"  # a run anywhere inside the target counts
    shutil.copytree(run_dir, parent / "deep" / "run")
    before = tree_digest(parent)
    _refused(invoke_cli(*writers["make-dataset"](parent, "--overwrite")), "deep/run is a megadmd training run")
    assert tree_digest(parent) == before


# --- one run per folder ----------------------------------------------------------------------------
def test_a_second_train_in_a_locked_folder_is_refused_naming_the_holder(run):
    run_dir, overrides = run
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from megadmd.safety.runlock import RunLock; "
         "lock = RunLock(sys.argv[1]); assert lock.acquire() is None; print('held', flush=True); time.sleep(120)",
         str(run_dir / ".megadmd.lock")], env=cli_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree_digest(run_dir)
        line = _refused(_train(overrides, "--resume", "auto", "--max-steps", "6"), "is in use by another megadmd train",
                        f"pid {holder.pid}")
        assert "host " in line and "started " in line
        assert tree_digest(run_dir) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_killed_run_is_taken_over(run):
    run_dir, overrides = run
    (run_dir / ".megadmd.lock").write_text("host gone, pid 999999, started 2026-01-01T00:00:00+00:00\n")
    r = _train(overrides, "--resume", "auto", "--max-steps", "5")
    assert r.exit_code == 0, r.output
    assert "taking over the lock of a run that is no longer running (host gone, pid 999999" in r.output
    assert (run_dir / ".megadmd.lock").read_text() == ""  # released at the end


def test_rerunning_train_without_resume_is_refused(run):
    run_dir, overrides = run
    before = tree_digest(run_dir)
    _refused(_train(overrides), f"already holds checkpoints (the newest: {CKPT4})", "--resume auto")
    assert tree_digest(run_dir) == before


def test_two_ranks_both_exit_2_when_the_folder_is_locked(run):
    from megadmd.safety.runlock import RunLock

    run_dir, overrides = run
    lock = RunLock(run_dir / ".megadmd.lock")
    assert lock.acquire() is None
    try:
        args = [a for o in [*overrides, "train.micro_batch_size=1"] for a in ("--set", o)]  # the same global batch
        port = str(free_port())
        ranks = [subprocess.Popen([sys.executable, "-m", "megadmd", "train", *args, "--resume", "auto",
                                   "--max-steps", "6"],
                                  env=dict(cli_env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
        outs = [p.communicate(timeout=300) for p in ranks]  # a rank waiting forever would time out here
    finally:
        lock.release()
    assert [p.returncode for p in ranks] == [2, 2], outs
    out = "".join(o + e for o, e in outs)
    lines = [ln for ln in out.splitlines() if ln.startswith("megadmd: error:")]
    assert len(lines) == 1 and "is in use by another megadmd train" in lines[0], out[-3000:]
    assert "Traceback" not in out


# --- verified checkpoints ------------------------------------------------------------------------
def test_flipped_bits_are_detected_skipped_by_resume_auto_and_pruning_keeps_the_good_one(run, tmp_path):
    run_dir, overrides = run
    ckpts = run_dir / "checkpoints"
    victim = _optim_file(ckpts / CKPT4)
    size = victim.stat().st_size
    _flip_bits(victim)
    assert victim.stat().st_size == size
    _refused(invoke_cli("convert", "to-diffusers", ckpts / CKPT4, "-o", tmp_path / "x"),
             f"{CKPT4}/generator/zero/", "does not match its content hash")
    assert not (tmp_path / "x").exists()
    r = _train(overrides, "--resume", "auto", "--max-steps", "5", "--set", "checkpoint.keep_last=2",
               "--set", "checkpoint.interval_steps=0")
    assert r.exit_code == 0, r.output + r.stderr
    assert f"skipping damaged checkpoint: {CKPT4}/generator/zero/" in r.output
    assert f"resumed from {ckpts / CKPT2} at step 2" in r.output
    names = sorted(p.name for p in ckpts.glob("step-*"))
    assert names == [CKPT2, CKPT4, "step-00000005"]  # the damaged one does not count: the good one stays
    assert (ckpts / "latest").read_text().strip() == "step-00000005"
    r = _train(overrides, "--resume", "auto", "--max-steps", "6", "--set", "checkpoint.keep_last=1",
               "--set", "checkpoint.interval_steps=0")
    assert r.exit_code == 0, r.output + r.stderr
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000006"]


def test_pruning_never_deletes_the_newest_verified_checkpoint(run):
    from types import SimpleNamespace

    from megadmd.checkpoint import Checkpointer
    from megadmd.config import resolve

    run_dir, overrides = run
    ckpts = run_dir / "checkpoints"
    _flip_bits(_optim_file(ckpts / CKPT4))
    cfg = resolve(overrides=[*overrides, "checkpoint.keep_last=1"])
    Checkpointer(cfg, SimpleNamespace(rank=0), {})._prune()
    assert (ckpts / CKPT2).is_dir()  # the only verified one; the damaged newer one does not count


def test_resume_auto_refuses_when_every_checkpoint_is_damaged(run):
    run_dir, overrides = run
    for name in (CKPT2, CKPT4):
        _flip_bits(_optim_file(run_dir / "checkpoints" / name))
    before = tree_digest(run_dir)
    _refused(_train(overrides, "--resume", "auto", "--max-steps", "6"), "no intact checkpoint",
             "refusing to start the run over")
    assert tree_digest(run_dir) == before


def test_a_checkpoint_saved_with_nan_is_refused_after_loading(run):
    """Files that match their hashes but hold NaN (saved by a run that had diverged)."""
    from megadmd.safety.manifest import write_manifest

    run_dir, overrides = run
    ckpt = run_dir / "checkpoints" / CKPT4
    ema = torch.load(ckpt / "ema" / "rank_0.pt", weights_only=False)
    name = next(iter(ema["shadow"]))
    ema["shadow"][name].view(-1)[0] = float("nan")
    torch.save(ema, ckpt / "ema" / "rank_0.pt")
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    (ckpt / "manifest.json").unlink()
    write_manifest(ckpt, {k: v for k, v in files.items() if k != "ema/rank_0.pt"})
    before = tree_digest(run_dir)
    _refused(_train(overrides, "--resume", "auto", "--max-steps", "6"), f"checkpoint {CKPT4} loads with non-finite",
             f"generator EMA {name} holds 1 non-finite", "--resume PATH")
    assert tree_digest(run_dir) == before


# --- resuming with another config -----------------------------------------------------------------
def test_a_changed_learning_rate_needs_allow_config_change(run):
    run_dir, overrides = run
    before = tree_digest(run_dir)
    changed = [*overrides, "optim.generator.lr=1e-05"]
    line = _refused(_train(changed, "--resume", "auto", "--max-steps", "5"), "changes the optimisation",
                    "optim.generator.lr 5e-05 -> 1e-05", "--allow-config-change")
    assert "train.max_steps 4 -> 5" in line  # every changed key is named
    assert tree_digest(run_dir) == before  # config.json included
    r = _train(changed, "--resume", "auto", "--max-steps", "5", "--allow-config-change")
    assert r.exit_code == 0, r.output + r.stderr
    assert "resume: the config differs from step-00000004's: " in r.output
    assert "optim.generator.lr 5e-05 -> 1e-05" in r.output and "accepted with --allow-config-change" in r.output
    assert json.loads((run_dir / "config.json").read_text())["optim"]["generator"]["lr"] == 1e-05


def test_max_steps_below_the_checkpoint_is_refused_without_touching_the_run(run):
    run_dir, overrides = run
    before = tree_digest(run_dir)
    _refused(_train(overrides, "--resume", "auto", "--max-steps", "3"),
             f"train.max_steps=3 is below the step of the checkpoint to resume ({CKPT4} is at step 4)")
    assert tree_digest(run_dir) == before


# --- a full disk ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["deepspeed", "manifest"])
def test_a_full_disk_during_a_save_removes_its_folder_and_keeps_the_previous_one(run, monkeypatch, where):
    import megadmd.safety.manifest as manifest_module

    run_dir, overrides = run
    ckpts = run_dir / "checkpoints"
    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "deepspeed":  # a write inside DeepSpeed's save_checkpoint
        real_save = torch.save

        def save(obj, f, *a, **k):
            if isinstance(f, str) and "step-00000006" in f and f.endswith("optim_states.pt"):
                raise full
            return real_save(obj, f, *a, **k)

        monkeypatch.setattr(torch, "save", save)
    else:  # megadmd's own last write
        real_write = manifest_module.write_manifest

        def write_manifest(root, *a, **k):
            if "step-00000006" in str(root):
                raise full
            return real_write(root, *a, **k)

        monkeypatch.setattr(manifest_module, "write_manifest", write_manifest)
    r = _train(overrides, "--resume", "auto", "--max-steps", "6", "--set", "checkpoint.interval_steps=1")
    _refused(r, "checkpoint step-00000006 could not be saved", "No space left on device",
             "the previous checkpoint step-00000005 and 'latest' are unchanged")
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", CKPT2, CKPT4, "step-00000005"]
    assert (ckpts / "latest").read_text().strip() == "step-00000005"


def test_generate_writes_its_folder_atomically_and_refuses_a_used_one(tmp_path, test_dataset_dir):
    model = save_test_model(tmp_path / "m")
    shape = ",".join(map(str, TEST_LATENT_SHAPE))
    out = tmp_path / "samples"
    args = ["generate", "--model", model, "--embeds", test_dataset_dir, "--latent-shape", shape, "-o", out]
    assert invoke_cli(*args).exit_code == 0
    before = tree_digest(out)
    _refused(invoke_cli(*args), "is not empty", "--overwrite")
    assert tree_digest(out) == before
    assert invoke_cli(*args, "--overwrite").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "samples"]  # no temporary folder left
