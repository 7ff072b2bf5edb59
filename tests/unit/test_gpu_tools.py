"""The GPU tools' logic without a GPU or a network: tools/gpu_wheels.py's dependency walk over a
fake package index, and tools/gpu_check_report.py's verdicts on hand-made measurements."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import gpu_check_report  # noqa: E402
import gpu_wheels  # noqa: E402

# name: (version, Requires-Dist)
FAKE_INDEX = {
    "diffusers": ("0.42.1", ["huggingface-hub>=0.34", "Pillow", "requests", "importlib_metadata", "numpy"]),
    "deepspeed": ("0.19.8", ["torch>=2.0.0", "ninja", "nvidia-ml-py", "pydantic>=2.0.0", "hjson",
                             "triton>=2.1.0; extra == \"sd\"", "einops"]),
    "requests": ("2.34.2", ["urllib3<3,>=1.21.1", "certifi>=2017.4.17", "PySocks!=1.5.7; extra == \"socks\"",
                            "chardet<6; python_version < \"3.8\""]),
    "einops": ("0.8.2", []), "hjson": ("3.1.0", []), "ninja": ("1.13.2", []),
    "importlib-metadata": ("10.2.0", ["zipp>=3.20"]), "zipp": ("4.1.2", []),
    "urllib3": ("2.8.0", []), "certifi": ("2026.10.19", []),
    "pydantic": ("2.12.0", ["pydantic-core==2.41.0", "typing-extensions>=4.12"]),
    "transformers": ("5.24.0", ["huggingface-hub[hf_xet]>=1.0", "numpy", "tokenizers", "safetensors",
                                "urllib3>=2; platform_machine == \"aarch64\""]),
    "huggingface-hub": ("1.2.0", ["tqdm", "hf-xet>=1.1; extra == \"hf_xet\""]),
    "hf-xet": ("1.2.0", []), "tqdm": ("4.67.0", []), "numpy": ("2.3.0", []), "tokenizers": ("0.23.1", []),
    "safetensors": ("0.8.0", []), "pydantic-core": ("2.41.0", ["typing-extensions"]),
    "typing-extensions": ("4.15.0", []), "pillow": ("12.0.0", []),
}


@pytest.fixture
def fake_index(monkeypatch):
    asked = []

    def metadata(requirements, flags):
        asked.append(list(requirements))
        entries = []
        for text in requirements:
            name = gpu_wheels.canonicalize_name(gpu_wheels.Requirement(text).name)
            version, requires = FAKE_INDEX[name]
            entries.append({"name": name, "version": version, "file": f"{name}-{version}.whl", "requires": requires})
        return entries

    monkeypatch.setattr(gpu_wheels, "metadata", metadata)
    return asked


def test_closure_skips_what_is_present_cuda_packages_and_unrequested_extras(fake_index):
    target = gpu_wheels.Target("3.12", ["manylinux_2_28_x86_64"])
    present = gpu_wheels.closure(["transformers", "pydantic"], target, stop=set())
    # hf-xet comes in through transformers' huggingface-hub[hf_xet]; urllib3 only on aarch64.
    assert set(present) == {"transformers", "huggingface-hub", "hf-xet", "tqdm", "numpy", "tokenizers",
                            "safetensors", "pydantic", "pydantic-core", "typing-extensions"}
    needed = gpu_wheels.closure(["deepspeed==0.19.8", "diffusers>=0.35", "transformers>=4.46"], target,
                                stop=set(present))
    # torch, triton (an extra) and nvidia-* never; present packages (transformers, pydantic,
    # huggingface-hub, numpy) are neither fetched nor entered; socks/chardet markers are false.
    assert set(needed) == {"deepspeed", "diffusers", "ninja", "hjson", "einops", "requests", "urllib3", "certifi",
                           "importlib-metadata", "zipp", "pillow"}
    assert needed["deepspeed"]["version"] == "0.19.8"


def test_closure_asks_once_per_level_with_merged_version_ranges(fake_index):
    # On aarch64 transformers also needs urllib3>=2: with requests' range, one merged request.
    target = gpu_wheels.Target("3.12", ["manylinux_2_28_aarch64"])
    found = gpu_wheels.closure(["requests", "transformers"], target, stop={"huggingface-hub"})
    assert fake_index[0] == ["requests", "transformers"]
    urllib3 = [r for r in fake_index[1] if r.startswith("urllib3")]
    assert len(urllib3) == 1
    assert set(gpu_wheels.Requirement(urllib3[0]).specifier) == set(gpu_wheels.Requirement("urllib3<3,>=1.21.1,>=2").specifier)
    assert "urllib3" in found and "huggingface-hub" not in found


def test_expand_platforms_lists_every_older_glibc_tag():
    tags = gpu_wheels.expand_platforms(["manylinux_2_28_x86_64"])
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags and tags[-1] == "manylinux2014_x86_64"
    assert len(tags) == 13  # 2_28 .. 2_17, then manylinux2014
    assert gpu_wheels.expand_platforms(["linux_x86_64"]) == ["linux_x86_64"]


def test_megadmd_requirements_come_from_setup_cfg_without_torch():
    reqs = gpu_wheels.megadmd_requirements()
    names = [gpu_wheels.canonicalize_name(gpu_wheels.Requirement(r).name) for r in reqs]
    assert "torch" not in names and "deepspeed" in names and "diffusers" in names


def _gpu_like_report(fwd_speedup, fwdbwd_speedup, dense_s, vsa_s, peak, plan):
    rows = []
    for mode, speedup in (("fwd", fwd_speedup), ("fwdbwd", fwdbwd_speedup)):
        rows.append({"grid": [20, 28, 52], "tokens": 29120, "mode": mode, "backend": "triton", "sparsity": 0.9,
                     "topk": 46, "num_cubes": 455, "best_s": 1.0, "first_s": 1.0, "speedup": speedup})
        rows.append({"grid": [20, 28, 52], "tokens": 29120, "mode": mode, "backend": "flex", "sparsity": 0.9,
                     "topk": 46, "num_cubes": 455, "best_s": 2.0, "first_s": 2.0, "speedup": speedup / 2})
    runs = {label: {"status": "ok", "mean_s_per_iter": s, "peak_device_gib": peak, "plan_total_gib": plan}
            for label, s in (("dense", dense_s), ("vsa", vsa_s))}
    return {"dry_run": False, "attention": {"status": "ok", "rows": rows}, "dmd": {"status": "ok", "runs": runs}}


def test_targets_are_evaluated_on_the_best_backend_and_the_plan():
    met = gpu_check_report.evaluate_targets(_gpu_like_report(6.0, 3.5, 10.0, 8.0, 52.0, 50.0))
    assert [t["met"] for t in met] == [True, True, True, True, True]
    assert met[0]["measured"] == "6.00x (triton)" and met[0]["required"] == ">= 5x"
    assert "+4.0%" in met[3]["measured"]
    missed = gpu_check_report.evaluate_targets(_gpu_like_report(4.9, 2.9, 8.0, 8.5, 56.0, 50.0))
    assert [t["met"] for t in missed] == [False, False, False, False, False]  # 56 is 12% over 50


def test_failed_parts_give_no_verdict():
    report = {"dry_run": False, "attention": {"status": "failed"},
              "dmd": {"status": "failed", "runs": {"dense": {"status": "failed"}, "vsa": {"status": "timeout"}}}}
    targets = gpu_check_report.evaluate_targets(report)
    assert all(t["met"] is None for t in targets)
    assert "failed" in targets[0]["note"] and "dense run failed" in targets[2]["note"]
