"""LoRA on one process with real DeepSpeed engines: every role against a merged copy and against
peft on the diffusers model, the teacher as the base with adapters off, what a step changes, and
the settings' checks."""
import deepspeed
import pytest
import torch

from megadmd.config import ConfigError, resolve
from megadmd.runner import build_trainer
from megadmd.zero import full_state_dict
from tests.helpers import TEST_WAN_CONFIG, random_params, set_zero3_params

RANK, ALPHA = 4, 8.0


def _cfg(tmp_path, model_dir, data_dir, *extra):
    return resolve(overrides=[
        f"model.teacher_path={model_dir}", f"data.path={data_dir}", f"output_dir={tmp_path / 'out'}",
        "train.micro_batch_size=2", "logging.tensorboard=false", "train.max_steps=4", "optim.generator.lr=1e-2",
        "optim.fake_score.lr=1e-2", "model.lora.enabled=true", f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}",
        *extra])


def randomize_adapter(module, seed: int) -> dict:
    """Give a LoRA role non-zero adapter weights (B included) on every rank; return them."""
    values = random_params({n: p.ds_shape for n, p in module.named_parameters()}, seed)
    set_zero3_params(module, values)
    return values


def merged_copy(base_state: dict, adapter: dict, scaling: float):
    """A plain diffusers model with every adapted weight W + scaling * B @ A, written out here
    independently of megadmd's export."""
    from megadmd.models import build_wan

    state = dict(base_state)
    for name in adapter:
        if name.endswith("lora_A.weight"):
            layer = name[: -len(".lora_A.weight")]
            state[f"{layer}.weight"] = state[f"{layer}.weight"] + scaling * adapter[f"{layer}.lora_B.weight"] @ adapter[name]
    model = build_wan(TEST_WAN_CONFIG)
    model.load_state_dict(state)
    return model.eval()


def _inputs(seed=3, batch=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 2, 4, 4, generator=g), torch.tensor([900.0, 300.0][:batch]),
            torch.randn(batch, 6, 32, generator=g))


def _out(module, x, t, text):
    return module(x, t, text, return_dict=False)[0]


@pytest.fixture
def trainer(tmp_path, test_model_dir, test_dataset_dir, single_process_world):
    return build_trainer(_cfg(tmp_path, test_model_dir, test_dataset_dir))


def test_fresh_adapters_make_both_roles_the_teacher_exactly(trainer):
    m = trainer.models
    x, t, text = _inputs()
    with torch.no_grad():
        teacher = _out(m.teacher.module, x, t, text)
        for role in ("generator", "fake_score"):
            assert torch.equal(_out(m.engine(role).module, x, t, text), teacher), role


def test_every_role_equals_a_merged_copy_and_the_teacher_is_the_base(trainer, test_model_dir):
    from megadmd.models import load_wan

    m = trainer.models
    adapters = {r: randomize_adapter(m.engine(r).module, seed=i) for i, r in enumerate(("generator", "fake_score"))}
    base_state = full_state_dict(m.teacher.module.view("teacher"))
    x, t, text = _inputs()
    with torch.no_grad():
        plain = _out(load_wan(test_model_dir).eval(), x, t, text)
        teacher_before = _out(m.teacher.module, x, t, text)
        for role, adapter in adapters.items():
            got = _out(m.engine(role).module, x, t, text)
            want = _out(merged_copy(base_state, adapter, ALPHA / RANK), x, t, text)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(got, plain, atol=1e-3)  # the adapter does something
        teacher_after = _out(m.teacher.module, x, t, text)
    torch.testing.assert_close(teacher_before, plain, rtol=1e-5, atol=1e-6)  # the teacher: adapters off
    assert torch.equal(teacher_after, teacher_before)  # and still off after the roles ran


def test_outputs_and_gradients_equal_peft_on_the_diffusers_model(trainer, test_model_dir):
    """The generator's engine (forward, backward through the frozen ZeRO-3 base) against peft's
    LoRA injected into the diffusers model and loaded with the same adapter weights."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    from megadmd.lora.adapter import peft_config
    from megadmd.models import load_wan

    engine = trainer.models.generator
    adapter = randomize_adapter(engine.module, seed=5)
    x, t, text = _inputs()
    w = torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(9))
    loss = (_out(engine, x, t, text) * w).sum()
    engine.backward(loss)
    ours = {n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    ref = load_wan(test_model_dir)
    layers = sorted({n[: -len(".lora_A.weight")] for n in adapter if n.endswith("lora_A.weight")})
    inject_adapter_in_model(peft_config(RANK, ALPHA, layers), ref)
    set_peft_model_state_dict(ref, adapter)
    ref_loss = (_out(ref, x, t, text) * w).sum()
    ref_loss.backward()
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    grads = {n.replace(".default", ""): p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads.keys() == ours.keys()
    for n in grads:
        torch.testing.assert_close(ours[n], grads[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    assert any(float(g.abs().max()) > 0 for n, g in ours.items() if n.startswith("blocks.0."))  # through block 1


def test_steps_change_each_roles_adapter_only_and_leave_the_base_bit_identical(trainer):
    m = trainer.models
    before = {r: full_state_dict(m.engine(r).module) for r in ("teacher", "generator", "fake_score")}
    batches = [trainer.data.next()]
    trainer.generator_step(batches)
    after_gen = {r: full_state_dict(m.engine(r).module) for r in before}
    trainer.fake_score_step(batches)
    after_fake = {r: full_state_dict(m.engine(r).module) for r in before}

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert not same(before["generator"], after_gen["generator"]) and same(before["fake_score"], after_gen["fake_score"])
    assert not same(after_gen["fake_score"], after_fake["fake_score"])
    assert same(after_gen["generator"], after_fake["generator"])
    for state in (after_gen, after_fake):
        assert same(before["teacher"], state["teacher"])  # the base never moves
    assert all(not p.requires_grad for p in m.teacher.module.parameters())
    assert {n.split(".")[-2] for n in before["generator"]} == {"lora_A", "lora_B"}  # adapters only


@pytest.mark.parametrize("override, message", [
    ("model.lora.rank=0", "model.lora.rank and model.lora.alpha must be positive"),
    ("model.lora.roles=[\"teacher\"]", "model.lora.roles must list generator and/or fake_score"),
    ("model.lora.target_modules=[]", "model.lora.target_modules must list Linear module names"),
    ("model.generator_path=/elsewhere", "model.generator_path must be empty"),
])
def test_bad_lora_settings_fail_with_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        resolve(overrides=["model.lora.enabled=true", override])
    assert "\n" not in str(err.value)


def test_targets_are_matched_like_peft_and_a_typo_names_the_layers():
    from megadmd.config import LoRAConfig
    from megadmd.lora.build import check_lora_targets

    n = check_lora_targets(LoRAConfig(enabled=True), TEST_WAN_CONFIG, None)
    assert n == 2 * (8 + 2)  # per block: q, k, v, out of both attentions and the two FFN layers
    assert check_lora_targets(LoRAConfig(enabled=True), TEST_WAN_CONFIG, 0.9) == 2 * n  # an adapter per expert
    with pytest.raises(ConfigError, match="'to_qq' matches no Linear layer.*attn1.to_q"):
        check_lora_targets(LoRAConfig(enabled=True, target_modules=["to_qq"]), TEST_WAN_CONFIG, None)


def test_backward_through_the_shared_base_gathers_it_block_by_block(tmp_path, test_model_dir, test_dataset_dir,
                                                                     single_process_world):
    """Every base parameter partitioned (threshold 0): during each update at most a part of the base
    is gathered, in forward and in backward, and none is left gathered after it. (A single module
    tree switched between roles kept the whole base gathered through the generator's backward: the
    teacher's no-grad forward in between resets ZeRO-3's per-module backward counters.) With the GAN
    term (the fake score's forward inside the generator's loss) and a checkpointed generator (its
    blocks recomputed in backward): the hardest case, which covers the plain one."""
    extra = ("dmd.gan.enabled=true", "dmd.gan.hidden_dim=16", "model.activation_checkpointing.generator=true")
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    part_all = "tests/distributed/zero3_partition_all.json"
    t = build_trainer(_cfg(tmp_path, test_model_dir, test_dataset_dir, *extra,
                           *(f"deepspeed.{r}={part_all}" for r in ("generator", "fake_score", "teacher"))))
    params = list(t.models.teacher.module.parameters())  # the base, once (the views share it)
    total = sum(p.ds_numel for p in params)
    coordinator = t.models.teacher.optimizer.get_param_coordinator()
    fetch, peak = coordinator.fetch_sub_module, {}

    def gathered() -> int:
        return sum(p.ds_numel for p in params if p.ds_status == ZeroParamStatus.AVAILABLE)

    def counting_fetch(module, forward):
        fetch(module, forward)
        key = "forward" if forward else "backward"
        peak[key] = max(peak.get(key, 0), gathered())

    coordinator.fetch_sub_module = counting_fetch
    batches = [t.data.next()]
    for update in (t.generator_step, t.fake_score_step):
        peak.clear()
        update(batches)
        assert 0 < peak["backward"] < 0.5 * total and peak["forward"] < 0.5 * total, (update.__name__, peak, total)
        assert gathered() == 0, update.__name__


def test_two_expert_role_has_an_adapter_per_expert_and_records_the_one_it_trained():
    """No DeepSpeed here: a LoRA role over a two-expert base routes a one-sided batch to its expert
    (keyword arguments only, see LoRARole.forward), names its parameters high./low. (the optimizer
    groups roles.py builds), and records the expert it ran with grad."""
    from megadmd.config import LoRAConfig
    from megadmd.lora.adapter import LoRARole, SharedBase
    from megadmd.models import WanExperts, build_wan
    from megadmd.roles import param_groups

    base = WanExperts(build_wan(TEST_WAN_CONFIG, seed=0), build_wan(TEST_WAN_CONFIG, seed=1), 0.875).requires_grad_(False)
    shared = SharedBase(base, ("generator",))
    role = LoRARole("generator", shared, LoRAConfig(enabled=True, rank=RANK, alpha=ALPHA), seed=0)
    assert [g["name"] for g in param_groups(role)] == ["high", "low"]
    values = random_params({n: p.shape for n, p in role.named_parameters()}, seed=3)
    with torch.no_grad():
        for n, p in role.named_parameters():
            p.copy_(values[n])
    x, _, text = _inputs()
    for t, expert in ((torch.tensor([950.0, 900.0]), "high"), (torch.tensor([300.0, 100.0]), "low")):
        role.used.clear()
        out = _out(role, x, t, text)
        own = {n[len(expert) + 1:]: p.detach() for n, p in role.named_parameters() if n.startswith(f"{expert}.")}
        want = _out(merged_copy(getattr(base, expert).state_dict(), own, ALPHA / RANK), x, t, text)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert role.used == {expert}
    with torch.no_grad():
        role.used.clear()
        _out(role, x, torch.tensor([950.0, 300.0]), text)  # a mixed batch (inference) runs both experts
    assert role.used == set()  # no grad: nothing to step


def _i2v_dataset(root, n=4):
    """A tiny image-to-video dataset written shard by shard (what `megadmd encode-images` makes)."""
    from megadmd.data.format import DatasetInfo, write_index, write_negative, write_shard

    g = torch.Generator().manual_seed(0)
    root.mkdir(parents=True)
    entry = write_shard(root, 0, text_embeds=[torch.randn(3, 32, generator=g) for _ in range(n)],
                        captions=[f"c{i}" for i in range(n)], first_index=0, max_text_len=6, text_dim=32,
                        latents=torch.randn(n, 4, 2, 4, 4, generator=g), image_latents=torch.randn(n, 4, 2, 4, 4, generator=g),
                        image_embeds=torch.randn(n, 5, 16, generator=g))
    write_negative(root, torch.randn(6, 32, generator=g), "negative")
    write_index(root, DatasetInfo(num_samples=n, text_dim=32, max_text_len=6, shard_size=256, latent_shape=[4, 2, 4, 4],
                                  shards=[entry], image_condition={"latent_shape": [4, 2, 4, 4], "embed_shape": [5, 16]}))
    return root


def test_image_to_video_roles_equal_a_merged_copy_and_train(tmp_path, single_process_world):
    """I2V: the condition channels and the CLIP embedding reach the adapted roles (the image
    cross-attention's add_k/add_v are not targets by default), and both updates run."""
    from megadmd.data.image import condition_channels
    from megadmd.models import build_wan, predict_velocity
    from tests.helpers import TEST_I2V_CONFIG, save_test_model

    model = save_test_model(tmp_path / "i2v", config=TEST_I2V_CONFIG)
    t = build_trainer(_cfg(tmp_path, model, _i2v_dataset(tmp_path / "data"), "dmd.generator_update_interval=1"))
    gen = t.models.generator.module
    adapter = randomize_adapter(gen, seed=2)
    base_state = full_state_dict(t.models.teacher.module.view("teacher"))
    batch = t.data.next()
    cond = {"condition": condition_channels(batch.image_latents), "image_embeds": batch.image_embeds}
    x = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(1))
    ts = torch.tensor([800.0, 200.0])
    merged = build_wan(TEST_I2V_CONFIG)
    state = dict(base_state)
    for n in adapter:
        if n.endswith("lora_A.weight"):
            layer = n[: -len(".lora_A.weight")]
            state[f"{layer}.weight"] = state[f"{layer}.weight"] + ALPHA / RANK * adapter[f"{layer}.lora_B.weight"] @ adapter[n]
    merged.load_state_dict(state)
    with torch.no_grad():
        got = predict_velocity(gen, x, ts, batch.text_embeds, torch.float32, **cond)
        want = predict_velocity(merged.eval(), x, ts, batch.text_embeds, torch.float32, **cond)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not any("add_k_proj" in n for n in adapter)
    before = {r: full_state_dict(t.models.engine(r).module) for r in ("teacher", "generator")}
    t.train_step(1)  # a generator and a fake-score update
    assert t.models.generator.global_steps == 1 and t.models.fake_score.global_steps == 1
    after = {r: full_state_dict(t.models.engine(r).module) for r in before}
    assert all(torch.equal(v, after["teacher"][k]) for k, v in before["teacher"].items())
    assert any(not torch.equal(v, after["generator"][k]) for k, v in before["generator"].items())
