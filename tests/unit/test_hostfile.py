"""Hostfile generation from Slurm node lists (what launch/slurm_megadmd.sbatch runs)."""
import subprocess
import sys

import pytest

from megadmd.config import ConfigError
from megadmd.parallel.hostfile import expand_nodelist, hostfile_text


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("node1,node2", ["node1", "node2"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("gpu[8-10],login2", ["gpu8", "gpu9", "gpu10", "login2"]),
    ("a[1-2]-ib,b3", ["a1-ib", "a2-ib", "b3"]),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("h[098-101]", ["h098", "h099", "h100", "h101"]),
])
def test_expand_slurm_nodelists(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu01]", "gpu[3-1]", "gpu[a-b]", "n1,n1", ""])
def test_bad_nodelists_fail_clearly(bad):
    with pytest.raises(ConfigError):
        expand_nodelist(bad)


def test_hostfile_lines_and_the_module_entry_point():
    assert hostfile_text(["a", "b"], 8) == "a slots=8\nb slots=8\n"
    r = subprocess.run([sys.executable, "-m", "megadmd.parallel.hostfile", "--slots", "4"],
                       env={"SLURM_JOB_NODELIST": "gpu[1-2]", "PATH": ""}, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "gpu1 slots=4\ngpu2 slots=4\n", r.stderr
    r = subprocess.run([sys.executable, "-m", "megadmd.parallel.hostfile", "--slots", "4"], env={"PATH": ""},
                       capture_output=True, text=True)
    assert r.returncode == 2 and "SLURM_JOB_NODELIST" in r.stderr
