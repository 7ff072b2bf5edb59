"""The planner's compute side: FLOPs of a Wan forward against a hand count and against what
PyTorch's FLOP counter sees on a real model, the iteration's FLOPs as the trainer's loop runs it,
the calibration on FastVideo's published run, and ``megadmd plan -c`` reading a run's config."""
import pytest
import torch

from megadmd.config import ConfigError
from megadmd.plan import LoopSettings, RoleCompute, WanShape, plan_time, wan_forward_flops

SMALL = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
             text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
LATENT = (4, 2, 8, 8)  # -> grid 2 x 4 x 4 = 32 tokens
TEXT = 8


def test_small_wan_forward_flops_by_hand():
    """D = 2 x 32 = 64, F = 128, L = 2, S = 2 x 4 x 4 = 32 tokens, T = 8 text tokens.

    Per block (2 FLOPs per multiply-add):
      self-attention  q, k, v, out: 4 x 2 S D^2        = 8 x 32 x 4096      = 1,048,576
                      scores + weighted sum: 2 x 2 S^2 D = 4 x 1024 x 64      =   262,144
      cross-attention q, out: 2 x 2 S D^2              = 4 x 32 x 4096      =   524,288
                      k, v of the text: 2 x 2 T D^2    = 4 x 8 x 4096       =   131,072
                      products: 2 x 2 S T D            = 4 x 32 x 8 x 64    =    65,536
      FFN             2 x 2 S D F                      = 4 x 32 x 64 x 128  = 1,048,576
      block total                                                           = 3,080,192
    Outside the blocks:
      patch embedding 2 S (4 x 1 x 2 x 2) D            = 2 x 32 x 16 x 64   =    65,536
      time embedder   2 (freq D + D^2)                 = 2 (2048 + 4096)    =    12,288
      time projection 2 x 6 D^2                        = 12 x 4096          =    49,152
      text embedder   2 T (text_dim D + D^2)           = 16 x (2048 + 4096) =    98,304
      output proj.    2 S D (4 x 4)                    = 2 x 32 x 64 x 16   =    65,536
      outside total                                                         =   290,816
    Forward: 2 x 3,080,192 + 290,816 = 6,451,200.
    """
    f = wan_forward_flops(WanShape.of(SMALL, LATENT, TEXT))
    assert f.token_linear == 2 * (1_048_576 + 524_288 + 1_048_576)
    assert f.text_linear == 2 * 131_072
    assert f.attention == 2 * (262_144 + 65_536)
    assert f.outside == 290_816
    assert f.per_rank() == 6_451_200
    # with sp 2, a rank does half of the token work and attention, all of the text and outside
    assert f.per_rank(sp=2) == (2 * 2_621_440 + 2 * 327_680) / 2 + 2 * 131_072 + 290_816


def _counted(model, inputs, backward: bool) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(*inputs, return_dict=False)[0]
        if backward:
            out.square().mean().backward()
    return counter.get_total_flops()


def _small_model(checkpointing=False):
    from megadmd.attention.processor import configure_attention
    from megadmd.models import build_wan

    model = build_wan(SMALL)
    configure_attention(model)
    if checkpointing:
        model.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(0)
    return model, (torch.randn(1, *LATENT, generator=g), torch.tensor([500.0]), torch.randn(1, TEXT, 32, generator=g))


def test_forward_backward_and_recompute_match_pytorchs_flop_counter():
    """PyTorch's FLOP counter on the real diffusers model (math attention, whose products are
    plain matmuls it counts) sees exactly the hand count. A backward costs two forwards except
    where an input needs no gradient: the latent into the patch embedding, the text into the text
    embedder, the sinusoidal timestep features into the time embedder (2 S 16 D + 2 T text_dim D +
    2 freq D = 65,536 + 32,768 + 4,096). Checkpointing adds one forward of the blocks."""
    f = wan_forward_flops(WanShape.of(SMALL, LATENT, TEXT))
    model, inputs = _small_model()
    assert _counted(model, inputs, backward=False) == f.per_rank() == 6_451_200
    no_input_grads = 65_536 + 32_768 + 4_096
    assert _counted(model, inputs, backward=True) == f.per_rank() + f.backward() - no_input_grads
    ckpt_model, _ = _small_model(checkpointing=True)
    ckpt_model.train()
    recompute = f.blocks()
    assert _counted(ckpt_model, inputs, backward=True) == f.per_rank() + f.backward() - no_input_grads + recompute


def test_vsa_forward_flops_by_hand():
    """Grid 4 x 8 x 8 (latent 4 x 4 x 16 x 16): C = 1 x 2 x 2 = 4 cubes of 64 tokens, S = 256.
    Sparsity 0.5 keeps K = ceil(0.5 x 4) = 2 key cubes per query cube: the fine stage is
    2 x 2 (64 C)(64 K) D = 4 x 256 x 128 x 64 and the coarse stage 4 C^2 D = 4 x 16 x 64, against
    4 S^2 D = 4 x 65,536 x 64 dense; the gate's projection adds 2 S D^2 per block."""
    shape = WanShape.of(SMALL, (4, 4, 16, 16), TEXT)
    dense, sparse = wan_forward_flops(shape), wan_forward_flops(shape, vsa_sparsity=0.5)
    D, S, L = 64, 256, 2
    assert dense.attention - sparse.attention == L * (4 * S * S * D - (4 * 256 * 128 * D + 4 * 16 * D))
    assert sparse.token_linear - dense.token_linear == L * 2 * S * D * D
    assert (sparse.outside, sparse.text_linear) == (dense.outside, dense.text_linear)


def test_iteration_flops_follow_the_trainers_loop():
    """Ten iterations, generator update every 5th, micro batch 2, both roles checkpointed, no VSA
    (all three roles cost F a forward, B a backward, R a recompute of the blocks):
      fake-score update (every iteration): generator no-grad F + fake score F + B + R
      generator update (iterations 5, 10): generator F + B + R, fake score no-grad F, teacher 2F
    total = 2 x (10 (2F + B + R) + 2 (4F + B + R)).
    Data-free mode with 3 steps, every step trained: the exit step k is uniform in {0, 1, 2},
    E[k] = 1, so each phase runs one more no-grad generator forward on average."""
    shape = WanShape.of(SMALL, LATENT, TEXT)
    f = wan_forward_flops(shape)
    F, B, R = f.per_rank(), f.backward(), f.blocks()
    loop = LoopSettings(generator_update_interval=5, micro_batch=2)
    t = plan_time(shape, loop, sp=1, world_size=8, max_steps=10, gpu="h100")
    assert t.total_flops_per_rank == pytest.approx(2 * (10 * (2 * F + B + R) + 2 * (4 * F + B + R)), rel=1e-12)
    data_free = plan_time(shape, LoopSettings(generator_update_interval=5, micro_batch=2, data_free=True),
                          sp=1, world_size=8, max_steps=10, gpu="h100")
    assert data_free.total_flops_per_rank - t.total_flops_per_rank == pytest.approx(2 * (10 + 2) * F, rel=1e-12)
    no_ckpt = LoopSettings(generator_update_interval=5, micro_batch=2, generator=RoleCompute(checkpointing=False),
                           fake_score=RoleCompute(checkpointing=False))
    assert t.total_flops_per_rank - plan_time(shape, no_ckpt, 1, 8, 10, gpu="h100").total_flops_per_rank == \
        pytest.approx(2 * (10 + 2) * R, rel=1e-12)
    # time: FLOPs per rank / (utilisation x peak); GPU-hours = hours x world
    assert t.seconds_per_iteration == pytest.approx(t.total_flops_per_rank / 10 / (0.12 * 989.4e12))
    assert t.gpu_hours == pytest.approx(t.seconds_per_iteration * 10 / 3600 * 8)
    frozen = LoopSettings(generator_update_interval=5, micro_batch=2, generator=RoleCompute(weight_grads=False))
    saved = t.total_flops_per_rank - plan_time(shape, frozen, 1, 8, 10, gpu="h100").total_flops_per_rank
    assert saved == pytest.approx(2 * 2 * (f.token_linear + f.text_linear + f.outside), rel=1e-12)


def test_fastvideo_1_3b_run_calibrates_the_utilisation():
    """FastVideo: 768 H200-hours for 4,000 iterations of Wan2.1-1.3B on 64 GPUs (77 x 448 x 832,
    29,120 tokens, VSA 0.8, batch 1 per GPU, checkpointing), i.e. 10.8 s per iteration. Our count
    is 1.267 PFLOP per GPU per iteration, so the run reached 1.267e15 / (10.8 x 989.4e12) = 11.9%
    of the H200's peak; the H200's default of 12% reproduces 768 GPU-hours within 2%. The 14B
    recipe of FastVideo's docs (64 H200, sp 4, gradient accumulation 4, VSA 0.9, 3,000 steps in
    about 52 h) is not fitted, and comes out within 10%."""
    from megadmd.config import resolve
    from megadmd.plan import PlanFlags, plan_run

    cfg = resolve(overrides=["preset=wan2.1-t2v-1.3b", "attention.vsa_sparsity=0.8"])
    p = plan_run(cfg, PlanFlags(nodes=8, gpus_per_node=8, gpu="h200"))
    assert p.memory.tokens == 29_120 and p.time.world_size == 64
    assert p.time.flops_per_iteration == pytest.approx(1.267e15, rel=1e-3)
    assert p.time.flops_per_iteration / (768 * 3600 / 4000 / 64 * 989.4e12) == pytest.approx(0.1186, abs=5e-4)
    assert p.time.gpu_hours == pytest.approx(768, rel=0.02)
    big = plan_run(resolve(overrides=["preset=wan2.1-t2v-14b", "attention.vsa_sparsity=0.9", "parallel.sp_size=4",
                                      "train.grad_accum_steps=4", "train.max_steps=3000"]),
                   PlanFlags(nodes=8, gpus_per_node=8, gpu="h200"))
    assert big.time.hours == pytest.approx(52, rel=0.10)


def test_bad_gpu_and_utilisation_fail_with_one_line():
    from megadmd.cli import GPU_NAMES
    from megadmd.plan import GPUS

    assert set(GPU_NAMES) == set(GPUS)  # the CLI's choices, kept out of its import path
    shape = WanShape.of(SMALL, LATENT, TEXT)
    with pytest.raises(ConfigError, match="unknown GPU 'v100'"):
        plan_time(shape, LoopSettings(), 1, 1, 10, gpu="v100")
    with pytest.raises(ConfigError, match=r"utilisation must be in \(0, 1\]"):
        plan_time(shape, LoopSettings(), 1, 1, 10, gpu="h100", utilisation=1.5)


def _plan_cli(*args):
    from click.testing import CliRunner

    from megadmd.cli import main

    return CliRunner().invoke(main, ["plan", *map(str, args)])


def _line(output: str, start: str) -> str:
    return next(ln for ln in output.splitlines() if ln.startswith(start))


def test_plan_reads_ema_vsa_and_checkpointing_from_a_config_file(tmp_path):
    """``plan -c run.yaml``: the file's EMA adds the generator's fp32 copy to the memory, its VSA
    lowers the generator's FLOPs (and adds the gate), its checkpointing switch changes both; the
    flags still override the file."""
    base = "preset: wan2.1-t2v-1.3b\nema: {decay: 0.0}\n"
    (tmp_path / "plain.yaml").write_text(base)
    (tmp_path / "run.yaml").write_text("preset: wan2.1-t2v-1.3b\nema: {decay: 0.999}\n"
                                       "attention: {vsa_sparsity: 0.8}\ntrain: {max_steps: 2000}\n")
    plain = _plan_cli("-c", tmp_path / "plain.yaml", "--nodes", "8", "--gpu", "h200")
    run = _plan_cli("-c", tmp_path / "run.yaml", "--nodes", "8", "--gpu", "h200")
    assert plain.exit_code == 0 and run.exit_code == 0, plain.output + run.output
    assert "VSA off; EMA off" in plain.output and "VSA sparsity 0.8; EMA on" in run.output
    assert "EMA " not in plain.output.split("item ")[1].split("\n\n")[0]
    assert _line(run.output, "EMA ").split()[3] == "0.09"  # 4 B x (1.419e9 + 70.8e6 gates) / 64 = 0.087 GiB
    gpu = [float(_line(r.output, "GPU per rank:").split()[3]) for r in (plain, run)]
    assert gpu[1] > gpu[0] + 0.08
    mean = [float(_line(r.output, "  mean per iteration:").split()[3]) for r in (plain, run)]
    assert mean == [pytest.approx(1.485, abs=1e-3), pytest.approx(1.267, abs=1e-3)]  # VSA 0.8 saves 15%
    assert "2,000 iterations" in run.output and "4,000 iterations" in plain.output
    # flags override the file; --set works as for train
    no_ema = _plan_cli("-c", tmp_path / "run.yaml", "--nodes", "8", "--gpu", "h200", "--no-ema",
                       "--set", "model.activation_checkpointing.generator=false")
    assert "EMA off" in no_ema.output and "generator off, fake_score on" in no_ema.output
    assert float(_line(no_ema.output, "  mean per iteration:").split()[3]) < mean[1]  # no recompute


def test_plan_flags_alone_still_work():
    r = _plan_cli("--preset", "wan2.1-t2v-14b", "--nodes", "8", "--sp", "4", "--no-ema", "--gpu-memory-gib", "80")
    assert r.exit_code == 0 and "fits: needs 18.7 of 80 GiB" in r.output
    assert "time: h100, 989.4 TFLOP/s peak at 12% utilisation" in r.output
    custom = _plan_cli("--preset", "wan2.1-t2v-1.3b", "--peak-tflops", "500", "--mfu", "0.3")
    assert "500 TFLOP/s peak at 30% utilisation" in custom.output
    bad = _plan_cli("--preset", "wan2.1-t2v-1.3b", "--set", "ema.decay=2")
    assert bad.exit_code == 2 and "ema.decay must be 0 (off) or in (0, 1)" in bad.output
