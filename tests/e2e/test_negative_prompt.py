"""encode-text's negative prompt on the command line: Wan's standard one by default, an empty
one or any other when given (the dataset it writes is checked in test_i2v.py, whose fixture
encodes with the default)."""


def test_encode_text_negative_prompt_default_and_explicit_choices(tmp_path, monkeypatch):
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
