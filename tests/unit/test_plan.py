"""The memory planner: parameter counts and per-rank bytes against hand calculations, layouts that
cannot work, activation formulas against what autograd saves on CPU, and the tiny preset's
prediction against the memory a real trainer allocates on CPU."""
import time

import pytest
import torch

from megadmd.config import ConfigError
from megadmd.plan import ActivationShape, ZeroSettings, format_plan, plan_memory, train_bytes, wan_params
from megadmd.presets import TINY_WAN_CONFIG, WAN21_1_3B_CONFIG, WAN21_14B_CONFIG

GIB = 2 ** 30


def wan_count(D, F, L, text_dim=4096, freq_dim=256, c_in=16, c_out=16, patch=4):
    """A Wan DiT's parameters, written out from diffusers' constructor."""
    block = (8 * D * D + 8 * D  # q, k, v, out of self- and cross-attention, with biases
             + 4 * D  # norm_q, norm_k of both attentions
             + 2 * D  # norm2 (cross_attn_norm: weight and bias)
             + 2 * D * F + F + D  # FFN
             + 6 * D)  # scale_shift_table
    embed = (c_in * patch * D + D  # patch embedding
             + freq_dim * D + D + D * D + D  # time embedder
             + 6 * D * D + 6 * D  # time projection
             + text_dim * D + D + D * D + D  # text embedder
             + D * c_out * patch + c_out * patch  # proj_out
             + 2 * D)  # output scale_shift_table
    return L * block + embed


P_13B = wan_count(1536, 8960, 30)
P_14B = wan_count(5120, 13824, 40)


def test_parameter_counts_by_hand_and_against_diffusers():
    assert P_13B == 1_418_996_800  # "~1.419e9"
    assert P_14B == 14_288_491_584  # "~14.29e9"
    assert wan_params(WAN21_1_3B_CONFIG).total == P_13B
    assert wan_params(WAN21_14B_CONFIG).total == P_14B
    tiny = wan_count(96, 384, 4, text_dim=32, freq_dim=64, c_in=4, c_out=4)
    assert wan_params(TINY_WAN_CONFIG).total == tiny == 686_704
    # VSA gives each generator block a D x D gate projection with bias
    assert wan_params(WAN21_1_3B_CONFIG, vsa_gates=True).total == P_13B + 30 * (1536 * 1536 + 1536)
    from diffusers import WanTransformer3DModel

    for cfg in (TINY_WAN_CONFIG, WAN21_1_3B_CONFIG, WAN21_14B_CONFIG):
        with torch.device("meta"):
            model = WanTransformer3DModel(**cfg)
        assert sum(p.numel() for p in model.parameters()) == wan_params(cfg).total


def _item(plan, name, role=""):
    return plan.gib(name, role) * GIB  # back to bytes


def test_wan21_1_3b_on_one_node_of_8_by_hand():
    plan = plan_memory("wan2.1-t2v-1.3b", nodes=1, gpus_per_node=8, sp=1, micro_batch=1)
    assert plan.tokens == 20 * 28 * 52 == 29_120  # latent 16 x 20 x 56 x 104, (1, 2, 2) patches
    n = P_13B / 8  # every tensor's size divides by 8, so ZeRO-3 adds no padding
    for role in ("generator", "fake_score", "teacher"):
        assert _item(plan, "parameters", role) == pytest.approx(2 * n)  # bf16
    for role in ("generator", "fake_score"):
        assert _item(plan, "gradients", role) == pytest.approx(2 * n)  # grad_accum_dtype unset: bf16
        assert _item(plan, "optimizer states", role) == pytest.approx((4 + 8) * n)  # master + m, v
        assert _item(plan, "ZeRO reduce bucket", role) == 5e7 * 4  # fp32 communication
    # parameters of <= 1e5 elements stay whole: per block 21 D + F (biases, norms, modulation);
    # patch_embedding and proj_out weights (98,304 each), 13 D of embedding biases, proj_out bias
    persistent = 30 * (21 * 1536 + 8960) + 2 * 98_304 + 13 * 1536 + 64
    assert _item(plan, "ZeRO persistent params", "teacher") == 2 * persistent == 2 * 1_453_120
    # Activations, generator update with checkpointing (D 1536, F 8960, H 12, s = S = 29,120):
    per_token_block = 1536 * (24 + 12 * 2 + 3 * 2) + 2 * 2 * 8960 + (24 + 12 + 8 * 12)  # 118,916
    block = per_token_block * 29_120 + 512 * 1536 * (2 + 2 * 2)  # + text K/V of 512 tokens
    inputs = 30 * 2 * 1536 * 29_120 + 2 * 512 * (4096 + 3 * 1536)  # block inputs + text embedder
    backward_peak = inputs + block + 2 * 1536 * 29_120  # one block recomputed + its output grad
    nograd = (4 * 2 * 1536 + 2 * 2 * 8960) * 29_120 + 2 * 512 * 1536  # FFN is the widest point
    end_of_forward = inputs + 1536 * (8 + 2) * 29_120  # + the output head on all tokens
    assert backward_peak > end_of_forward + 2 * nograd  # the teacher's CFG forward runs at 2b
    assert _item(plan, "activations", "generator") == pytest.approx(backward_peak, rel=1e-12)
    assert backward_peak == 6_249_621_248
    # Gathered parameters: the generator keeps R/3 = 333,333,333 elements for reuse, plus its
    # largest tensor (time_proj, 6 D^2) and a prefetch bucket; the teacher a window of the same.
    largest = 6 * 1536 ** 2
    gathered = (largest + 50_000_000 + 333_333_333) + (largest + 50_000_000)
    assert _item(plan, "ZeRO gathered params") == pytest.approx(2 * gathered)
    reduce_transients = 5e7 * 2 + 2 * largest  # fp32 bucket cast to bf16 + one full gradient
    dmd = 12 * 4 * (16 * 20 * 56 * 104) + 3 * 4 * 512 * 4096
    transient = backward_peak + 2 * gathered + reduce_transients + dmd
    resident = 3 * 2 * n + 2 * (2 + 12) * n + 3 * 2 * persistent + 2 * 2e8
    total = resident + transient + (1.5 * GIB + 0.10 * transient)
    assert plan.peak_phase == "generator update"
    assert plan.gpu_total_gib * GIB == pytest.approx(total, rel=1e-9)
    assert plan.gpu_total_gib == pytest.approx(15.09, abs=0.01) and plan.fits
    assert plan.cpu_total_gib == 0


def test_wan21_14b_on_64_gpus_with_sp_4_by_hand():
    plan = plan_memory("wan2.1-t2v-14b", nodes=8, gpus_per_node=8, sp=4)
    assert (plan.world_size, plan.dp) == (64, 16)
    n = P_14B / 64  # ZeRO-3 partitions over all dp x sp ranks
    assert _item(plan, "parameters", "generator") == pytest.approx(2 * n)
    assert _item(plan, "optimizer states", "fake_score") == pytest.approx(12 * n)
    assert 12 * n / GIB == pytest.approx(2.495, abs=1e-3)
    # Each rank holds s = 29,120 / 4 = 7,280 tokens; self-attention sees all tokens, 10 of 40 heads.
    s, S, D, F = 7280, 29_120, 5120, 13824
    per_token_block = D * (24 + 12 * 2 + 3 * 2) + 2 * 2 * F + (24 + 12 + 8 * 40)
    block = per_token_block * s + 512 * D * 6
    inputs = 40 * 2 * D * s + 2 * 512 * (4096 + 3 * D)
    head = (8 + 2) * D * S  # gathered back to all S tokens before norm_out
    backward_peak = inputs + max(head, block + 2 * D * s)
    # No-grad forwards: the widest point is the output head on all S tokens, (c + 8) D per token
    # (its bf16 input and two fp32 temporaries), wider than a block's FFN on s tokens
    nograd = (2 + 8) * D * S + 2 * 512 * D
    assert (2 + 8) * D * S > (4 * 2 * D + 2 * 2 * F) * s
    generator_update = max(inputs + head + 2 * nograd, backward_peak)  # teacher CFG at batch 2
    assert generator_update == inputs + head + 2 * nograd == 7_485_128_704
    assert _item(plan, "activations", "generator") == pytest.approx(generator_update, rel=1e-12)
    # without checkpointing all 40 blocks keep their tensors through the teacher's forward
    held = 40 * block + head + 2 * 512 * (4096 + 3 * D)
    assert plan.activations_other_gib * GIB == pytest.approx(held + 2 * nograd, rel=1e-12)
    assert plan.fits and 18 < plan.gpu_total_gib < 19


def test_optimizer_offload_moves_states_gradients_and_ema_to_the_cpu():
    plan = plan_memory("wan2.1-t2v-1.3b", nodes=1, gpus_per_node=8, offload="optimizer", ema=True)
    n = P_13B / 8
    assert plan.gib("parameters", "generator", "GPU") * GIB == pytest.approx(2 * n)
    assert plan.gib("gradients", "generator", "CPU") * GIB == pytest.approx(2 * n)
    # fp32 master + m + v, and the fp32 gradient buffer the CPU optimizer steps on
    assert plan.gib("optimizer states", "generator", "CPU") * GIB == pytest.approx(16 * n)
    assert plan.gib("EMA", "generator", "CPU") * GIB == pytest.approx(4 * n)
    cpu = 2 * (2 + 16) * n + 4 * n + 8 * n  # two roles, EMA, one optimizer step's temporaries
    assert plan.cpu_total_gib * GIB == pytest.approx(cpu)
    on_gpu = plan_memory("wan2.1-t2v-1.3b", nodes=1, gpus_per_node=8, ema=True)
    freed = 2 * (2 + 12) * n + 4 * n  # gradients, states and EMA leave the GPU
    assert (on_gpu.gpu_total_gib - plan.gpu_total_gib) * GIB == pytest.approx(freed, rel=1e-6)
    everything = plan_memory("wan2.1-t2v-1.3b", nodes=1, gpus_per_node=8, offload="all")
    assert everything.gib("parameters", "teacher", "CPU") * GIB == pytest.approx(2 * n)
    assert everything.gib("parameters", "teacher", "GPU") == 0


def test_deepspeed_templates_size_the_zero_buffers():
    from megadmd.plan import default_zero_settings

    shipped = default_zero_settings()  # ds_configs/zero3.json and zero3_inference.json
    assert shipped["generator"] == ZeroSettings()  # 5e7 buckets, 1e5 persistence, fp32 communication
    assert shipped["teacher"].communication_bytes is None
    # fp32 gradient partitions, a small bucket, and no reuse window
    tuned = ZeroSettings.from_template({
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 1e6, "stage3_max_reuse_distance": 0},
        "communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"}})
    plan = plan_memory("wan2.1-t2v-1.3b", nodes=1, gpus_per_node=8,
                       zero={"generator": tuned, "fake_score": tuned, "teacher": shipped["teacher"]})
    largest = 6 * 1536 ** 2
    assert _item(plan, "gradients", "generator") == pytest.approx(4 * P_13B / 8)
    assert _item(plan, "ZeRO reduce bucket", "generator") == 1e6 * 4
    assert _item(plan, "ZeRO reduce transients", "generator") == 2 * largest  # no dtype cast
    assert _item(plan, "ZeRO gathered params") == 2 * 2 * (largest + 50_000_000)


def test_without_checkpointing_1_3b_does_not_fit_8_gpus():
    plan = plan_memory("wan2.1-t2v-1.3b", nodes=1, gpus_per_node=8, activation_checkpointing=False)
    assert not plan.fits
    assert "does not fit" in plan.reason and "turn on activation checkpointing" in plan.reason
    assert plan.gib("activations", "generator") > 80 > plan.activations_other_gib
    assert plan_memory("wan2.1-t2v-1.3b", nodes=1, gpus_per_node=8, sp=4).fits


def test_vsa_sparsity_changes_only_the_selected_cube_indices():
    """455 cubes (5 x 7 x 13) of 64 tokens; top-k keeps ceil((1 - s) * 455) key cubes: 228 at 0.5,
    46 at 0.9. Only the [b, H/sp, C, K] int64 selection depends on the sparsity."""
    def acts(sparsity, ckpt):
        p = plan_memory("wan2.1-t2v-1.3b", nodes=1, gpus_per_node=8, vsa_sparsity=sparsity,
                        activation_checkpointing=ckpt)
        return p.gib("activations", "generator") * GIB

    one_block = 8 * 12 * 455 * (228 - 46)
    assert acts(0.5, True) - acts(0.9, True) == pytest.approx(one_block)
    assert acts(0.5, False) - acts(0.9, False) == pytest.approx(30 * one_block)
    assert 30 * one_block / acts(0.9, False) < 0.003  # VSA's saving is in compute, not memory


@pytest.mark.parametrize("kwargs, message", [
    (dict(nodes=1, gpus_per_node=6, sp=4), "world size 6 is not divisible by parallel.sp_size=4"),
    (dict(nodes=1, gpus_per_node=8, sp=8), "12 attention heads do not divide by parallel.sp_size=8"),
    (dict(model="wan2.1-t2v-2b"), "unknown preset 'wan2.1-t2v-2b'"),
    (dict(video_size=(76, 448, 832)), "frames must be 4k\\+1"),
    (dict(video_size=(77, 450, 832)), "multiples of 16"),
    (dict(offload="cpu"), "offload must be one of none, optimizer, all"),
    (dict(vsa_sparsity=1.0), "VSA sparsity must be in \\[0, 1\\)"),
    (dict(micro_batch=0), "micro batch must be a positive integer"),
    (dict(model=dict(WAN21_1_3B_CONFIG)), "give a video size"),
    (dict(activation_checkpointing={"critic": True}), "must be among generator, fake_score, teacher"),
])
def test_bad_inputs_fail_with_one_clear_line(kwargs, message):
    kwargs = {"model": "wan2.1-t2v-1.3b", **kwargs}
    with pytest.raises(ConfigError, match=message) as err:
        plan_memory(kwargs.pop("model"), **kwargs)
    assert "\n" not in str(err.value)


def test_format_plan_is_an_aligned_table():
    text = format_plan(plan_memory("wan2.1-t2v-14b", nodes=8, gpus_per_node=8, sp=4))
    rows = [ln for ln in text.splitlines() if ln.startswith(("item ", "parameters ", "activations "))]
    assert len(rows) == 5  # header, three parameter shards, activations
    assert len({ln.index("GPU") for ln in rows[1:]} | {rows[0].index("where")}) == 1  # one column
    assert "29,120 tokens per sample (7,280 per rank with sp 4)" in text
    assert "dp 16 x sp 4" in text and text.splitlines()[-1].startswith("fits: needs 18.7 of 80 GiB")


# ---------------------------------------------------------------------------------------------
# The formulas against CPU measurements (the CPU has no fused RMSNorm: device="cpu").

SMALL_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=4,
                 out_channels=4, text_dim=32, freq_dim=32, ffn_dim=1024, num_layers=2, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)


def _small_model(dtype, checkpointing=False):
    from megadmd.attention.processor import configure_attention
    from megadmd.models import build_wan

    model = build_wan(SMALL_WAN)
    configure_attention(model)
    if checkpointing:
        model.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 8, 16, 32, generator=g, dtype=dtype), torch.tensor([300.0, 700.0]),
              torch.randn(2, 16, 32, generator=g, dtype=dtype))  # 8 x 8 x 16 = 1,024 tokens, 16 text
    return model.to(dtype), inputs


def _shape(c):
    return ActivationShape(d=256, ffn=1024, heads=4, layers=2, text_dim=32, tokens=1024, local_tokens=1024,
                           sp=1, text_len=16, grid=(8, 8, 16), c=c, fused_rms_norm=False)


def _with_lora(model, rank):
    """The generator's LoRA role over ``model`` (frozen, as the shared base is), and its extra
    activations as the planner counts them (megadmd/lora/plan.py)."""
    from megadmd.config import LoRAConfig
    from megadmd.lora.adapter import LoRARole, SharedBase
    from megadmd.lora.plan import adapter_shape, extra_activation_bytes

    dtype = next(model.parameters()).dtype
    role = LoRARole("generator", SharedBase(model.requires_grad_(False), ("generator",)),
                    LoRAConfig(enabled=True, rank=rank), seed=0).to(dtype)
    return role, extra_activation_bytes(adapter_shape(SMALL_WAN, rank), _shape(torch.finfo(dtype).bits // 8))


@pytest.mark.parametrize("dtype, lora_rank", [(torch.float32, 0), (torch.bfloat16, 0), (torch.float32, 32),
                                             (torch.bfloat16, 32)])
def test_saved_activations_match_what_autograd_keeps(dtype, lora_rank):
    """With LoRA the frozen base keeps less than the full model (no modulation parameters or norm
    weights need gradients), and its adapters add lora_B's rank-r input (megadmd/lora/plan.py)."""
    model, (x, t, text) = _small_model(dtype)
    extra = (0.0, 0.0, 0.0)
    if lora_rank:
        model, extra = _with_lora(model, lora_rank)
    params = {p.untyped_storage().data_ptr() for p in (*model.parameters(), *getattr(model, "lora_base", model).parameters())}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, t, text, return_dict=False)
    predicted = 2 * train_bytes(_shape(torch.finfo(dtype).bits // 8), False, None, extra)[0]
    # what the formula leaves out: RoPE tables, the latent input, timestep embeddings (~1%)
    assert sum(saved.values()) == pytest.approx(predicted, rel=0.03)


def _peak_growth(fn):
    """Peak growth of PyTorch's CPU allocations while ``fn`` runs, and the growth at its end."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    gc.collect()  # tensors of earlier tests freed inside the window would count as negative growth
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak, total


@pytest.mark.parametrize("checkpointing", [False, True])
def test_forward_backward_peak_with_and_without_checkpointing(checkpointing):
    model, (x, t, text) = _small_model(torch.float32, checkpointing)

    def step():
        model(x, t, text, return_dict=False)[0].square().mean().backward()

    peak, _ = _peak_growth(step)
    grads = 4 * sum(p.numel() for p in model.parameters())  # allocated during the backward
    predicted = 2 * train_bytes(_shape(4), checkpointing, None)[0] + grads
    # the planner is conservative: with checkpointing, the recomputed block's input is the
    # checkpointed tensor itself in fp32 (counted twice), and the head is freed before the recompute
    assert 0.90 * predicted <= peak <= 1.02 * predicted


@pytest.mark.parametrize("lora_rank", [0, 16])
def test_tiny_preset_prediction_vs_allocations_of_a_real_trainer(tmp_path, single_process_world, capsys, lora_rank):
    """Build the tiny preset's three DeepSpeed engines and run a generator and a fake-score update
    on CPU; compare the peak growth of PyTorch's allocations with the planner's total minus its
    GPU runtime overhead (no CUDA context or NCCL here). One rank: nothing is gathered. With LoRA
    (rank 16, both roles) the three roles hold one base and two adapters."""
    from megadmd.config import resolve
    from megadmd.runner import build_trainer
    from megadmd.toy.builtin import write_toy_dataset

    data = write_toy_dataset(tmp_path / "data", 64, seed=0)  # one small shard, written beforehand
    batch = 16
    cfg = resolve(overrides=[
        "preset=tiny", f"data.path={data}", f"output_dir={tmp_path / 'out'}", "train.max_steps=2",
        f"train.micro_batch_size={batch}", "dmd.generator_update_interval=2", "logging.tensorboard=false",
        "checkpoint.interval_steps=0",
        *(["model.lora.enabled=true", f"model.lora.rank={lora_rank}"] if lora_rank else [])])
    start = time.perf_counter()
    peak, end = _peak_growth(lambda: build_trainer(cfg).train())  # iteration 2 updates both roles
    seconds = time.perf_counter() - start
    plan = plan_memory("tiny", nodes=1, gpus_per_node=1, micro_batch=batch, precision="fp32",
                       activation_checkpointing=False, device="cpu", lora_rank=lora_rank)
    predicted = plan.total_without_overhead_gib() * GIB
    buckets = 2 * plan.gib("ZeRO reduce bucket", "generator") * GIB  # 2 x 5e7 fp32: 381.5 MiB
    resident = sum(i.gib for i in plan.items if i.name in (
        "parameters", "gradients", "optimizer states", "ZeRO reduce bucket")) * GIB
    mib = 2 ** 20
    with capsys.disabled():
        print(f"\ntiny, LoRA rank {lora_rank}, micro batch {batch}, {seconds:.1f} s: peak measured {peak / mib:.1f} MiB, predicted "
              f"{predicted / mib:.1f} MiB; without the reduce buckets {(peak - buckets) / mib:.1f} vs "
              f"{(predicted - buckets) / mib:.1f} MiB; held after the iterations {end / mib:.1f} vs "
              f"{resident / mib:.1f} MiB")
    assert peak == pytest.approx(predicted, rel=0.05)
    # the reduce buckets are exact; what remains (states, activations, DMD tensors) within 15%
    assert peak - buckets == pytest.approx(predicted - buckets, rel=0.15)
    assert end == pytest.approx(resident, rel=0.05)  # what stays allocated after the iterations


def test_lora_14b_on_one_node_of_8_by_hand():
    """model.lora at rank 64 on the default targets: one base copy (the teacher's), adapters only in
    the trainable roles -- 14B fits 8 GPUs without sequence parallelism, where full weights do not."""
    plan = plan_memory("wan2.1-t2v-14b", nodes=1, gpus_per_node=8, lora_rank=64)
    D, F, r, L = 5120, 13824, 64, 40
    # per block: q, k, v, out of both attentions (D -> D) and the FFN (D -> F -> D): A is r x in, B out x r
    adapter = L * (8 * (r * D + D * r) + (r * D + F * r) + (r * F + D * r))
    assert adapter == 306_708_480 and plan.params["generator"] == plan.params["fake_score"] == adapter
    n = adapter / 8
    for role in ("generator", "fake_score"):
        assert _item(plan, "parameters", role) == pytest.approx(2 * n)
        assert _item(plan, "gradients", role) == pytest.approx(2 * n)
        assert _item(plan, "optimizer states", role) == pytest.approx(12 * n)
        assert _item(plan, "ZeRO persistent params", role) == 0  # r x D = 327,680 > 1e5: all partitioned
    assert _item(plan, "parameters", "teacher") == pytest.approx(2 * P_14B / 8)  # the base, once
    full = plan_memory("wan2.1-t2v-14b", nodes=1, gpus_per_node=8)
    # Activations relative to full weights, per sample (S = s = 29,120 tokens, T = 512, c = 2, fused
    # RMSNorm): lora_B keeps r c per token of 8 video-token layers and 2 text-token layers a block;
    # the frozen modulation no longer keeps the norm1 and norm3 outputs, ff_output.float() (3 x 4 D)
    # and the attention output (c D); the head keeps norm_out's fp32 input only (-(4 + c) D per
    # token); the frozen text embedder keeps only its output (-c T (text_dim + 2 D))
    from megadmd.lora.plan import adapter_shape, extra_activation_bytes

    a = ActivationShape(d=D, ffn=F, heads=40, layers=L, text_dim=4096, tokens=29_120, local_tokens=29_120, sp=1,
                        text_len=512, grid=(20, 28, 52), c=2, fused_rms_norm=True)
    block, head, text = extra_activation_bytes(adapter_shape(WAN21_14B_CONFIG, r), a)
    assert block == r * 2 * (8 * 29_120 + 2 * 512) - (12 + 2) * D * 29_120 == -2_057_371_648
    assert head == -(4 + 2) * D * 29_120 and text == -2 * 512 * (4096 + 2 * D)
    assert train_bytes(a, False, None)[0] - train_bytes(a, False, None, (block, head, text))[0] == pytest.approx(
        -(L * block + head + text))
    assert not full.fits and full.gpu_total_gib == pytest.approx(83.0, abs=0.05)
    assert plan.fits and plan.gpu_total_gib == pytest.approx(29.2, abs=0.05)
    assert "14.288B parameters, once; LoRA rank 64 trains generator 0.307B, fake_score 0.307B" in format_plan(plan)


def test_cli_prints_the_table_and_exits_3_when_it_does_not_fit():
    from click.testing import CliRunner

    from megadmd.cli import main

    runner = CliRunner()
    ok = runner.invoke(main, ["plan", "--preset", "wan2.1-t2v-14b", "--nodes", "8", "--sp", "4", "--no-ema",
                              "--gpu-memory-gib", "80"])
    assert ok.exit_code == 0 and "fits: needs 18.7 of 80 GiB" in ok.output
    too_big = runner.invoke(main, ["plan", "--preset", "wan2.1-t2v-1.3b", "--no-activation-checkpointing"])
    assert too_big.exit_code == 3 and "does not fit" in too_big.output
    bad = runner.invoke(main, ["plan", "--preset", "wan2.1-t2v-1.3b", "--gpus-per-node", "6", "--sp", "4"])
    assert bad.exit_code == 2 and "not divisible by parallel.sp_size=4" in bad.output
    lora = runner.invoke(main, ["plan", "--preset", "wan2.1-t2v-14b", "--lora-rank", "64", "--no-ema",
                                "--gpu-memory-gib", "80"])
    assert lora.exit_code == 0 and "fits: needs 29.2 of 80 GiB" in lora.output
    from_config = runner.invoke(main, ["plan", "--preset", "wan2.1-t2v-14b", "--set", "model.lora.enabled=true"])
    assert from_config.exit_code == 0 and "fits: needs 29.3 of 79.6 GiB" in from_config.output  # the preset's EMA
