"""encode-text's negative prompt: Wan's standard one by default (in the dataset and its index),
an empty one when asked for explicitly."""
import json
import subprocess
import sys

from tests.helpers import cli_env, save_tiny_text_encoder


def test_encode_text_defaults_to_wans_negative_prompt(tmp_path):
    from safetensors import safe_open

    from megadmd.data.text import WAN_NEGATIVE_PROMPT

    enc = save_tiny_text_encoder(tmp_path / "umt5")
    (tmp_path / "p.txt").write_text("a cat runs\n")
    r = subprocess.run([sys.executable, "-m", "megadmd", "encode-text", "--prompts", str(tmp_path / "p.txt"), "-o",
                        str(tmp_path / "text"), "--text-encoder", str(enc), "--max-len", "16"],
                       env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "text" / "index.json").read_text())["extra"]["negative_prompt"] == WAN_NEGATIVE_PROMPT
    with safe_open(str(tmp_path / "text" / "negative.safetensors"), "pt") as f:
        assert f.metadata()["caption"] == WAN_NEGATIVE_PROMPT
    assert WAN_NEGATIVE_PROMPT.startswith("Bright tones, overexposed, static, blurred details, subtitles")


def test_an_empty_negative_prompt_stays_an_explicit_choice(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import megadmd.data.text as text
    from megadmd.cli import main

    seen = []

    class Info:
        num_samples = 1

    monkeypatch.setattr(text, "run_encode_text", lambda *a, **k: seen.append(a[4]) or Info())
    monkeypatch.setattr("megadmd.cli.shutdown_distributed", lambda: None)
    (tmp_path / "p.txt").write_text("a cat runs\n")
    for extra, want in (([], text.WAN_NEGATIVE_PROMPT), (["--negative-prompt", ""], ""),
                        (["--negative-prompt", "blurry"], "blurry")):
        r = CliRunner().invoke(main, ["encode-text", "--prompts", str(tmp_path / "p.txt"), "-o", str(tmp_path / "o"),
                                      "--text-encoder", str(tmp_path), *extra], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert seen.pop() == want
