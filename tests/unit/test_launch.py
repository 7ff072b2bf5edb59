"""The files in launch/: recipe configs resolve to the published recipes, and the Slurm wrapper
builds its hostfile and launch command from SLURM_JOB_NODELIST."""
import os
import subprocess
from pathlib import Path

import pytest

from megadmd.config import resolve

LAUNCH = Path(__file__).resolve().parents[2] / "launch"


def test_the_1_3b_recipe_config():
    cfg = resolve(str(LAUNCH / "configs" / "fastwan2.1-t2v-1.3b-vsa.yaml"))
    assert cfg.preset == "wan2.1-t2v-1.3b"
    assert cfg.optim.generator.lr == 2e-6 and cfg.train.max_steps == 4000
    assert cfg.dmd.flow_shift == 8.0 and cfg.dmd.denoising_steps == [1000, 757, 522]
    assert cfg.attention.vsa_sparsity == 0.8
    assert cfg.checkpoint.interval_steps == 500 and cfg.validation.interval_steps == 200
    assert cfg.parallel.sp_size == 1


def test_the_14b_recipe_config():
    cfg = resolve(str(LAUNCH / "configs" / "fastwan2.1-t2v-14b-sp4-vsa.yaml"))
    assert cfg.preset == "wan2.1-t2v-14b" and cfg.parallel.sp_size == 4
    assert cfg.attention.vsa_sparsity == 0.9 and cfg.dmd.flow_shift == 3.0


@pytest.mark.parametrize("nodelist, hosts", [("gpu[07-08]", ["gpu07", "gpu08"]), ("a1,b2,c3", ["a1", "b2", "c3"])])
def test_sbatch_wrapper_writes_the_hostfile_and_launches_per_node(tmp_path, nodelist, hosts):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    srun = bindir / "srun"
    srun.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$SRUN_LOG"\n')  # records its command
    srun.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", SLURM_JOB_NODELIST=nodelist,
               SLURM_JOB_ID="42", GPUS_PER_NODE="4", SRUN_LOG=str(tmp_path / "srun.log"))
    r = subprocess.run(["bash", str(LAUNCH / "slurm_megadmd.sbatch"), "run.yaml", "--set", "train.seed=3"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "logs" / "hostfile-42").read_text() == "".join(f"{h} slots=4\n" for h in hosts)
    cmd = (tmp_path / "srun.log").read_text()
    assert "--no_ssh" in cmd and "--node_rank $SLURM_NODEID" in cmd and f"--master_addr {hosts[0]}" in cmd
    assert "trap '' USR1" in cmd and "--config run.yaml" in cmd and "train.seed=3" in cmd
