"""The README quickstart and CI stay in step; packaging declares what the design card says."""
import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _quickstart_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [ln for b in blocks for ln in b.splitlines() if ln.strip() and not ln.startswith("#")]


def test_quickstart_is_two_commands_and_ci_runs_the_second():
    cmds = _quickstart_commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("megadmd train") and "torch==2.13.0" in cmds[0]
    ci = [ln for ln in (ROOT / ".ci/run").read_text().splitlines() if ln.startswith("python3 -m venv")]
    assert ci == [cmds[1]]


def test_setup_cfg_dependencies_and_entry_point():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    deps = cfg["options"]["install_requires"]
    for name in ("torch", "deepspeed", "diffusers", "transformers", "einops", "safetensors",
                 "tensorboard", "click"):
        assert re.search(rf"^{name}\b", deps, flags=re.M), name
    torch_req = re.search(r"^torch(.*)$", deps, flags=re.M).group(1)
    from packaging.specifiers import SpecifierSet

    assert "2.13.0" in SpecifierSet(torch_req.strip())
    assert "megadmd = megadmd.cli:main" in cfg["options.entry_points"]["console_scripts"]
    assert "pytest" in cfg["options.extras_require"]["test"]
