"""The files in launch/: recipe configs resolve to the published recipes, and the Slurm wrapper
builds its hostfile and launch command from SLURM_JOB_NODELIST, and the recipe scripts
launch deepspeed with the hostfile and their config."""
import os
import subprocess
import sys
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
    # the wrapper runs `python -m megadmd...`: this interpreter's folder first, venv activated or not
    path = os.pathsep.join([str(bindir), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = dict(os.environ, PATH=path, SLURM_JOB_NODELIST=nodelist,
               SLURM_JOB_ID="42", GPUS_PER_NODE="4", SRUN_LOG=str(tmp_path / "srun.log"))
    r = subprocess.run(["bash", str(LAUNCH / "slurm_megadmd.sbatch"), "run.yaml", "--set", "train.seed=3"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "logs" / "hostfile-42").read_text() == "".join(f"{h} slots=4\n" for h in hosts)
    cmd = (tmp_path / "srun.log").read_text()
    assert "--no_ssh" in cmd and "--node_rank $SLURM_NODEID" in cmd and f"--master_addr {hosts[0]}" in cmd
    assert "trap '' USR1" in cmd and "--config run.yaml" in cmd and "train.seed=3" in cmd


@pytest.mark.parametrize("script, config", [("fastwan2.1-t2v-1.3b-vsa.sh", "fastwan2.1-t2v-1.3b-vsa.yaml"),
                                            ("fastwan2.1-t2v-14b-sp4-vsa.sh", "fastwan2.1-t2v-14b-sp4-vsa.yaml")])
def test_recipe_scripts_launch_deepspeed_with_the_hostfile_and_their_config(tmp_path, script, config):
    """The recipe scripts go through multinode.sh to `deepspeed --hostfile`, master = the
    hostfile's first host, with their own config and any extra arguments passed on."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "deepspeed"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$DS_LOG"\n')  # records its arguments
    fake.chmod(0o755)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", HOSTFILE=str(hostfile),
               DS_LOG=str(tmp_path / "ds.log"))
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    r = subprocess.run(["bash", str(LAUNCH / script), "--set", "train.seed=3"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "ds.log").read_text().split("\n")
    assert args[:6] == ["--hostfile", str(hostfile), "--master_addr", "node-a", "--master_port", "29500"]
    assert args[6:10] == ["--module", "megadmd", "train", "--config"]
    assert args[10] == f"launch/configs/{config}" and args[11:13] == ["--set", "train.seed=3"]
