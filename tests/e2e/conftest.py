"""Fixtures of the end-to-end tests shared across files."""
import subprocess
import sys

import pytest

from tests.helpers import cli_env


@pytest.fixture(scope="session")
def default_job(tmp_path_factory):
    """`megadmd train` with no arguments at all (the README's first command), in a fresh folder,
    run once for the session (tests/e2e/test_quality.py reads it)."""
    cwd = tmp_path_factory.mktemp("default-job")
    r = subprocess.run([sys.executable, "-m", "megadmd", "train"], cwd=cwd, env=cli_env(), capture_output=True,
                       text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, cwd / "runs" / "megadmd-tiny"
