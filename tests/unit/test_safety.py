"""megadmd.safety in one process: the output-folder rules, atomic folders, the run lock, content
hashes in manifests, and the config comparison of a resume."""
import json
import os

import pytest

from megadmd.config import ConfigError
from megadmd.io_utils import atomic_dir
from megadmd.safety import folders, manifest
from megadmd.safety.runfolder import _is_free, config_changes
from megadmd.safety.runlock import RunLock


def _run_folder(path):
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_atomic_dir_never_replaces_a_non_empty_folder_unless_asked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with atomic_dir(out) as tmp:  # an empty folder is fine
        (tmp / "a").write_text("1")
    with pytest.raises(ConfigError, match="was created by something else"):
        with atomic_dir(out) as tmp:
            (tmp / "b").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "a").read_text() == "1"
    with atomic_dir(out, replace=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_check_output_decisions(tmp_path):
    assert folders.check_output(tmp_path / "new", "make-dataset", False).action == "create"
    (tmp_path / "empty").mkdir()
    assert folders.check_output(tmp_path / "empty", "make-dataset", False).action == "create"
    user = tmp_path / "user"
    user.mkdir()
    (user / "f").write_text("x")
    with pytest.raises(ConfigError, match="is not empty"):
        folders.check_output(user, "make-dataset", False)
    assert folders.check_output(user, "make-dataset", True).action == "replace"
    with pytest.raises(ConfigError, match="is a megadmd training run"):
        folders.check_output(_run_folder(tmp_path / "run"), "make-dataset", True)


def test_train_adds_a_run_to_a_user_folder_only_when_asked_and_never_over_its_config(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="is not empty .* and is not a megadmd run; pass --overwrite"):
        folders.check_run_dir(user, False)
    assert folders.check_run_dir(user, True) is False
    (user / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds a config.json that is not a megadmd run's"):
        folders.check_run_dir(user, True)
    assert folders.check_run_dir(_run_folder(tmp_path / "run"), False) is True


def test_resumable_output_continues_only_with_the_same_settings(tmp_path):
    out = tmp_path / "out"
    target = folders.check_output(out, "synth", False, settings={"steps": 50, "shape": (4, 2)})
    folders.begin_output(target, "synth", {"steps": 50, "shape": (4, 2)})
    (out / "shard-000000.safetensors").write_bytes(b"x")
    assert folders.check_output(out, "synth", False, settings={"steps": 50, "shape": [4, 2]}).action == "resume"
    with pytest.raises(ConfigError, match=r"other settings \(steps 50 -> 60\)"):
        folders.check_output(out, "synth", False, settings={"steps": 60, "shape": [4, 2]})
    assert folders.check_output(out, "synth", True, settings={"steps": 60, "shape": [4, 2]}).action == "replace"
    with pytest.raises(ConfigError, match="unfinished output of 'megadmd synth'"):
        folders.check_output(out, "encode-text", True, settings={})


def test_the_scan_finds_runs_below_and_does_not_follow_links(tmp_path):
    target = tmp_path / "target"
    (target / "a" / "b").mkdir(parents=True)
    run = _run_folder(tmp_path / "elsewhere" / "run")
    os.symlink(run, target / "a" / "link-to-run")
    assert folders.check_output(target, "generate", True).action == "replace"  # the link is not a run inside
    _run_folder(target / "a" / "b" / "run")
    with pytest.raises(ConfigError, match="a/b/run is a megadmd training run"):
        folders.check_output(target, "generate", True)
    deep = tmp_path / "deep"
    (deep / "1" / "2" / "3" / "4" / "5" / "6").mkdir(parents=True)
    with pytest.raises(ConfigError, match="nested too deep"):
        folders.check_output(deep, "generate", True)


def test_the_output_must_not_overlap_an_input(tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    for out in (src, src / "sub", tmp_path):
        with pytest.raises(ConfigError, match="overlaps the input"):
            folders.check_not_input(out, [src])
    folders.check_not_input(tmp_path / "other", [src, None])


def test_run_lock_names_its_holder_and_takes_over_a_stale_one(tmp_path, caplog):
    from tests.helpers import reset_logging

    reset_logging()  # an earlier trainer in this session may have pointed megadmd's log elsewhere
    path = tmp_path / ".megadmd.lock"
    a, b = RunLock(path), RunLock(path)
    assert a.acquire() is None
    holder = b.acquire()  # flock is per open file: a second open in the same process conflicts
    assert f"pid {os.getpid()}" in holder and "host " in holder
    a.release()
    assert path.read_text() == ""
    path.write_text("host gone, pid 1, started then\n")  # left by a run killed with kill -9
    with caplog.at_level("WARNING", logger="megadmd"):
        assert b.acquire() is None
    assert "taking over the lock of a run that is no longer running (host gone, pid 1" in caplog.text
    b.release()


def test_manifest_hashes_detect_one_flipped_bit_in_any_block(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "BLOCK_BYTES", 1000)  # several blocks per file, hashed in parallel
    root = tmp_path / "ckpt"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "big.bin").write_bytes(bytes(range(256)) * 20)  # 5120 bytes: 6 blocks
    (root / "small.json").write_text("{}")
    hashed = manifest.hash_files(root, ["sub/big.bin"], threads=3)
    manifest.write_manifest(root, hashed)
    doc = json.loads((root / "manifest.json").read_text())
    assert set(doc["files"]) == {"sub/big.bin", "small.json"} and all("hash" in v for v in doc["files"].values())
    assert manifest.verify(root) is None
    data = bytearray((root / "sub" / "big.bin").read_bytes())
    data[4321] ^= 0x01
    (root / "sub" / "big.bin").write_bytes(bytes(data))
    assert manifest.verify(root, deep=False) is None  # the size alone cannot tell
    assert manifest.verify(root) == "ckpt/sub/big.bin does not match its content hash (damaged on disk)"
    assert manifest.verify(root, only=("small",)) is None


def test_manifests_of_older_megadmd_are_checked_by_size(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"12345")
    (tmp_path / "manifest.json").write_text(json.dumps({"a.bin": 5}))
    assert manifest.read_manifest(tmp_path) == ({"a.bin": {"bytes": 5}}, False)
    assert manifest.verify(tmp_path) is None
    (tmp_path / "a.bin").write_bytes(b"123")
    assert "has 3 bytes, expected 5" in manifest.verify(tmp_path)


def test_ranks_share_the_files_by_size_and_cover_each_once():
    files = {f"f{i}": {"bytes": b} for i, b in enumerate([100, 90, 50, 40, 30, 5, 5, 1])}
    shares = [manifest.share_of(files, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == sorted(files)
    loads = [sum(files[f]["bytes"] for f in s) for s in shares]
    assert max(loads) - min(loads) <= 100 and shares[0][0] == "f0"


def test_config_changes_and_the_keys_a_resume_may_change_freely():
    old = {"optim": {"generator": {"lr": 1e-5}}, "train": {"max_steps": 4}, "checkpoint": {"resume": ""},
           "only_old": 1}
    new = {"optim": {"generator": {"lr": 2e-5}}, "train": {"max_steps": 8}, "checkpoint": {"resume": "auto"},
           "only_new": 2}
    assert config_changes(old, new) == [("optim.generator.lr", 1e-5, 2e-5), ("train.max_steps", 4, 8)]
    assert _is_free("train.max_steps") and _is_free("logging.interval_steps") and _is_free("deepspeed.generator")
    for key in ("optim.generator.lr", "dmd.denoising_steps", "dmd.flow_shift", "train.seed", "ema.decay",
                "dmd.generator_update_interval", "optim.fake_score.betas", "model.teacher_path"):
        assert not _is_free(key), key
