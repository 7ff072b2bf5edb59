"""Two node ranks on this machine through the real deepspeed launcher (--no_ssh, --node_rank),
with an sp=2 group spanning both "nodes"."""
import subprocess
import sys

from tests.helpers import cli_env, free_port


def test_two_node_ranks_train_with_sp_spanning_them(tmp_path):
    data = tmp_path / "data"
    r = subprocess.run([sys.executable, "-m", "megadmd", "make-dataset", "-o", str(data), "-n", "8",
                        "--latent-shape", "4,4,8,8", "--text-len", "4", "--text-dim", "32"],
                       env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes, one process each\nnode-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    procs = []
    for node_rank in (1, 0):
        cmd = ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
               "--master_addr", "127.0.0.1", "--master_port", port, "--module", "megadmd", "train",
               "-o", str(tmp_path / "run"), "--max-steps", "5", "--set", f"data.path={data}",
               "--set", "parallel.sp_size=2", "--set", "logging.interval_steps=5"]
        procs.append(subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, cwd=tmp_path))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[1][-3000:] + outs[0][-3000:]
    node0 = outs[1]
    assert "world=2 dp=1 sp=2" in node0
    assert "step 5/5 | loss/generator" in node0  # both phases ran across the two node ranks
