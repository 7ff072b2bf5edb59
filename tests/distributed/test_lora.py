"""LoRA on 2 gloo ranks with every parameter partitioned (the frozen base and the adapters):
sp=2 outputs and gradients of every role against peft on the diffusers model, dp=2 training
against one rank, and the 2-rank checkpoint resumed on one rank through `convert to-universal`."""
import torch

from tests.distributed.workers import lora_forward_backward, train_and_record
from tests.helpers import assert_same_training, save_test_dataset, spawn

PARTITION_ALL = "tests/distributed/zero3_partition_all.json"
RANK, ALPHA = 4, 8.0
LORA = ["model.lora.enabled=true", f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}",
        *(f"deepspeed.{r}={PARTITION_ALL}" for r in ("generator", "fake_score", "teacher"))]


def _peft_reference(model_dir, values: dict, vsa: bool, inputs: tuple):
    """The role computed by peft's LoRA on the diffusers model (plus the VSA gates), single process:
    (output, gradients by megadmd's parameter names)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    from megadmd.attention.processor import VSASettings, configure_attention
    from megadmd.lora.adapter import peft_config
    from megadmd.lora.export import is_lora_key
    from megadmd.models import attach_vsa_gates, load_wan, predict_velocity

    x, step, text, w = inputs
    ref = load_wan(model_dir)
    if vsa:
        attach_vsa_gates(ref, None)
    configure_attention(ref, vsa=VSASettings(0.5, "torch") if vsa else None)
    lora = {k: v for k, v in values.items() if is_lora_key(k)}
    layers = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
    inject_adapter_in_model(peft_config(RANK, ALPHA, layers), ref)
    set_peft_model_state_dict(ref, lora)
    gates = {k: v for k, v in values.items() if not is_lora_key(k)}
    ref.load_state_dict(gates, strict=False)
    for n, p in ref.named_parameters():
        p.requires_grad_(".lora_" in n or n in gates)
    v = predict_velocity(ref, x, step, text, torch.float32)
    ((v * w).sum() / v.shape[0]).backward()
    return v.detach(), {n.replace(".default", ""): p.grad for n, p in ref.named_parameters() if p.requires_grad}


def test_sp2_roles_over_a_partitioned_base_match_peft_in_outputs_and_gradients(tmp_path, test_model_dir):
    """sp=2, every parameter partitioned over the 2 ranks: the generator (adapter + VSA gates, its
    VSA processors switched onto the shared base), then the fake score (dense), then the teacher
    (adapters off) -- each equals the single-process peft model, gradients through the frozen base
    included."""
    from megadmd.models import load_wan, predict_velocity

    data = save_test_dataset(tmp_path / "data", num_samples=4, latent_shape=[4, 5, 12, 14])  # 210 tokens, 8 VSA cubes
    out = tmp_path / "r.pt"
    overrides = [f"model.teacher_path={test_model_dir}", f"data.path={data}", f"output_dir={tmp_path / 'run'}",
                 "parallel.sp_size=2", "attention.vsa_sparsity=0.5", "attention.vsa_backend=torch",
                 "logging.tensorboard=false", *LORA]
    spawn(lora_forward_backward, 2, overrides, str(out), 0.5)
    r = torch.load(out, weights_only=False)
    for role in ("generator", "fake_score"):
        want_out, want_grads = _peft_reference(test_model_dir, r["adapters"][role], role == "generator", r["inputs"])
        torch.testing.assert_close(r[role]["output"], want_out, rtol=1e-5, atol=1e-5, msg=role)
        got = r[role]["grads"]
        assert got.keys() == want_grads.keys(), role
        for n in got:
            torch.testing.assert_close(got[n], want_grads[n], rtol=1e-4, atol=1e-5, msg=lambda m, role=role, n=n: f"{role} {n}: {m}")
    assert any(".to_gate_compress." in n for n in r["generator"]["grads"])  # the gates train in the adapter engine
    x, step, text, _ = r["inputs"]
    with torch.no_grad():
        plain = predict_velocity(load_wan(test_model_dir), x, step, text, torch.float32)
    torch.testing.assert_close(r["teacher_before"], plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(r["teacher_after"], r["teacher_before"])
    total = sum(p.numel() for p in load_wan(test_model_dir).parameters())
    assert 0.45 * total <= r["local_numel"]["teacher"] <= 0.55 * total  # one base copy, partitioned


def _train_overrides(tmp, model_dir, data, name, micro_batch):
    return [f"model.teacher_path={model_dir}", f"data.path={data}", f"output_dir={tmp / name}",
            f"train.micro_batch_size={micro_batch}", "train.max_steps=4", "logging.interval_steps=1",
            "logging.tensorboard=false", "dmd.generator_update_interval=2", "optim.generator.lr=1e-2",
            "optim.fake_score.lr=1e-2", "dmd.gan.enabled=true", "dmd.gan.hidden_dim=16", "ema.decay=0.5",
            # Adam's default eps (1e-8) turns float rounding in a gradient element near 0 into a
            # different step of up to lr; at 1e-4 small gradients step in proportion (test_zero3_dp)
            "optim.generator.eps=1e-4", "optim.fake_score.eps=1e-4",
            "checkpoint.interval_steps=4", *LORA]


def test_dp2_training_matches_one_rank_and_resumes_on_one_rank(tmp_path, test_model_dir, single_process_world):
    """Two ranks spawned; the one-rank run and the one-rank resume in this process (a spawn each
    cost more than the runs: the one-process world is what a one-GPU `megadmd train` gets)."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from megadmd.cli import main
    from megadmd.config import resolve
    from megadmd.runner import build_trainer, run_train
    from megadmd.zero import full_state_dict

    data = save_test_dataset(tmp_path / "data", num_samples=8)
    two = tmp_path / "two.pt"
    spawn(train_and_record, 2, _train_overrides(tmp_path, test_model_dir, data, "two", 1), str(two))
    t = run_train(resolve(overrides=_train_overrides(tmp_path, test_model_dir, data, "one", 2)))
    a = {"history": t.history, "states": {r: full_state_dict(t.models.engine(r).module) for r in ("generator", "fake_score")}}
    b = torch.load(two, weights_only=False)
    assert [s for s, _ in a["history"]] == [1, 2, 3, 4]
    assert_same_training(a, b, keys=("loss/discriminator",))
    for role in ("generator", "fake_score"):
        for s in b["sizes"]:  # the adapter engine's optimizer holds half of the adapter on each rank
            assert 0.45 <= s[role]["optimizer_fp32_local"] / s[role]["total"] <= 0.55
    assert any(k.startswith("gan_head.") for k in a["states"]["fake_score"])  # the head trains fully
    ckpt = tmp_path / "two" / "checkpoints" / "step-00000004"
    r = CliRunner().invoke(main, ["convert", "to-universal", str(ckpt)])
    assert r.exit_code == 0, r.output
    assert (ckpt / "generator" / "zero_universal" / "done").is_file()
    # one rank, micro batch 2: the same global batch (a resume refuses another without --allow-config-change)
    resumed = build_trainer(resolve(overrides=_train_overrides(tmp_path, test_model_dir, data, "two", 2)
                                    + ["checkpoint.resume=auto", "train.max_steps=5"]))
    try:
        assert resumed.state.step == 4
        for role in ("generator", "fake_score"):
            got = full_state_dict(resumed.models.engine(role).module)
            assert got.keys() == b["states"][role].keys(), role
            assert all(torch.equal(got[k], v) for k, v in b["states"][role].items()), role
        got_ema = resumed.ema.full_state_dict()
    finally:
        resumed.writer.close()
        resumed.run_lock.release()
    ema = load_file(str(ckpt / "ema" / "ema.safetensors"))
    assert ema.keys() == got_ema.keys() and all(torch.equal(got_ema[k], v) for k, v in ema.items())
