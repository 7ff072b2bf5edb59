"""The DMD2 training loop: one iteration = (every N-th) a generator update, then a fake-score update.

Read ``train_step`` top to bottom:
1. draw ``grad_accum_steps`` distinct micro-batches (FastVideo reuses one object for all of them,
   a bug we do not copy);
2. on iterations where ``step % generator_update_interval == 0``: the generator update
   (``generator_step``), with the teacher and fake score called as bare modules under no_grad;
3. every iteration: the fake-score update on fresh generator samples (``fake_score_step``).

Each update runs inside ``guarded_update``: an update with non-finite values is not applied, and
only applied updates are counted and logged (guard.py).

Each engine is called as ``engine(...)`` only in its own update (see roles.py for why).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from .. import flow
from ..attention.processor import vsa_sparsity_at
from ..config import RunConfig
from ..data.image import condition_channels
from ..data.loader import Batch, BatchSource, stack_conditioning, stackable
from ..metrics import MetricsWriter, ScalarWindow, StepTimer, format_line, memory_stats
from ..monitoring.progress import progress
from ..models import predict_velocity
from ..rng import Purpose, SampleRNG
from ..roles import restrict_step_to_used_experts
from ..sampling import noised_data, simulate_to_exit, step_timesteps
from ..zero import has_leaf_blocks
from . import gan, losses, regression
from .guard import NonFiniteError, NonFiniteGuard, skip_counts

log = logging.getLogger("megadmd")

PHASE_GENERATOR = 0
PHASE_FAKE_SCORE = 1


@dataclass
class TrainState:
    step: int = 0  # iterations completed
    generator_updates: int = 0  # updates applied (a skipped one is not an update)
    fake_score_updates: int = 0
    generator_skipped: int = 0  # updates dropped for non-finite values (guard.py)
    fake_score_skipped: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict) -> None:
        """From a checkpoint's trainer state; counters it predates keep their value (0)."""
        for f in dataclasses.fields(self):
            if f.name in d:
                setattr(self, f.name, int(d[f.name]))


class DMDTrainer:
    def __init__(self, cfg: RunConfig, models, data: BatchSource, pstate, rng: SampleRNG,
                 writer: MetricsWriter, device: torch.device, vsa=None, ema=None, preemption=None,
                 hooks: Optional[list[Callable[["DMDTrainer"], None]]] = None, sample_shape: tuple = (),
                 regression_data: Optional[BatchSource] = None):
        self.cfg = cfg
        self.dmd = cfg.dmd
        self.models = models
        self.data = data
        self.pstate = pstate
        self.rng = rng
        self.writer = writer
        self.device = device
        self.state = TrainState()
        self.current_step = 0
        self.window = ScalarWindow()
        # the last generator update's x0 and DMD direction (rank 0's share), for histograms at the
        # next log line; kept only when logging.histograms is on and this rank writes
        self.histograms: dict[str, torch.Tensor] = {}
        self.history: list[tuple[int, dict]] = []  # (step, logged values), for tests and summaries
        self.sample_shape = tuple(sample_shape)  # [C, F, H, W] of a generated latent
        self.vsa = vsa  # the generator's VSASettings (shared by its attention processors), or None
        self.ema = ema  # PartitionEMA of the generator, or None
        self.preemption = preemption  # PreemptionFlag, or None
        self.preempted = False
        self.hooks = hooks or []  # called after every iteration (checkpoints, validation, metrics)
        self.boundary_ratio = cfg.model.boundary_ratio  # Wan2.2 two-expert routing, or None
        # the fake score's denoising and GAN forwards as one call (fake_score_forward): one expert only
        self.fake_score_one_call = self.boundary_ratio is None
        self.regression_data = regression_data  # (noise, teacher latent) pairs of dmd.regression
        self.guard = NonFiniteGuard(cfg.train.nonfinite, cfg.train.max_consecutive_skips, group=pstate.world_group)
        steps = list(self.dmd.denoising_steps)
        self.steps = flow.warp_steps(steps, self.dmd.flow_shift) if self.dmd.warp_denoising_step else steps

    # --- model calls ---------------------------------------------------------------------------
    def conditioning(self, batch: Batch, repeat: int = 1) -> dict:
        """Image-to-video inputs of a batch (empty for text-to-video), repeated for forwards of
        batch ``repeat * B`` (the teacher's CFG pair keeps the image and drops only the text)."""
        if batch.image_latents is None:
            return {}
        cond = condition_channels(batch.image_latents)
        return {"condition": torch.cat([cond] * repeat), "image_embeds": torch.cat([batch.image_embeds] * repeat)}

    def velocity_fn(self, call, batch: Batch):
        dtype, text, cond = self.models.dtype, batch.text_embeds, self.conditioning(batch)
        return lambda x_t, t: predict_velocity(call, x_t, t, text, dtype, **cond)

    def latent_shape(self, batch: Batch) -> tuple:
        if batch.latents is not None:
            return tuple(batch.latents.shape[1:])
        return tuple(self.sample_shape)  # data-free mode: the latent preflight settled on

    def generator_input(self, batch: Batch, phase: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The input of the generator forward that makes this batch's sample, and its timesteps:
        in synthetic-latent mode, a dataset latent noised to a random step of the list; in
        data-free mode, the generator's own sampler run without grad up to the exit step."""
        pos = batch.positions.tolist()
        if not self.dmd.simulate_generator_forward:
            idx = self.generator_step_indices(batch, phase)
            eps = self.rng.randn(pos, batch.latents.shape[1:], Purpose.GEN_NOISE, phase)
            t = step_timesteps(self.steps, idx, self.device)
            return noised_data(batch.latents.float(), t, eps), t
        idx = self.exit_indices(batch, phase)
        shape = self.latent_shape(batch)
        start = self.rng.randn(pos, shape, Purpose.SIM_START, phase)
        renoise = lambda i: self.rng.randn(pos, shape, Purpose.SIM_RENOISE, phase, sub=i)  # noqa: E731
        # the no-grad prefix runs through the bare module, never the engine
        vfn_no_grad = self.velocity_fn(self.models.generator.module, batch)
        return simulate_to_exit(vfn_no_grad, self.steps, idx, start, renoise)

    def generator_x0(self, call, batch: Batch, phase: int) -> torch.Tensor:
        """A generator sample for this batch: one forward of ``call`` on ``generator_input``."""
        x, t = self.generator_input(batch, phase)
        return self.x0_at(call, batch, x, t)

    def x0_at(self, call, batch: Batch, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x0 of one forward of ``call`` at input ``x`` and timesteps ``t``, on ``batch``'s conditioning."""
        return flow.x0_from_velocity(x, self.velocity_fn(call, batch)(x, t), flow.sigma_from_t(t))

    def exit_indices(self, batch: Batch, phase: int) -> torch.Tensor:
        """The step at which data-free simulation exits: one draw per global micro-step, shared by
        all samples and all ranks. Every rank must run the same number of generator forwards, or
        ZeRO-3's parameter gathers would wait on each other forever (DMD2's reference code
        broadcasts this step for the same reason)."""
        first = self.first_trained_step
        k = first + self.rng.randint([batch.micro_step], len(self.steps) - first, Purpose.SIM_EXIT, phase)
        return k.expand(batch.size)

    @property
    def first_trained_step(self) -> int:
        """The first entry of the step list the generator is trained at. With
        dmd.train_first_step=false it is the second: the first step sees pure noise, so its output
        is one point per prompt, and the DMD loss pulls that point towards a single mode, which the
        later steps then inherit (a deliberate option; FastVideo and DMD2 train every step)."""
        return 0 if self.dmd.train_first_step else 1

    def teacher_x0(self, x_t: torch.Tensor, t: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The teacher's CFG x0 prediction; cond and uncond share one forward of batch 2B."""
        b = x_t.shape[0]
        text = torch.cat([batch.text_embeds, self.data.negative(b)])
        v = predict_velocity(self.models.teacher.module, torch.cat([x_t, x_t]), torch.cat([t, t]),
                             text, self.models.dtype, **self.conditioning(batch, repeat=2))
        sigma = flow.sigma_from_t(t)
        x0_cond = flow.x0_from_velocity(x_t, v[:b], sigma)
        x0_uncond = flow.x0_from_velocity(x_t, v[b:], sigma)
        guided = losses.cfg_combine(x0_cond, x0_uncond, self.dmd.guidance_scale, self.dmd.cfg_form)
        return losses.limit_guidance(guided, x0_cond, t, self.dmd.guidance_interval)

    def score_timesteps(self, batch: Batch, purpose: Purpose, phase: int) -> torch.Tensor:
        """Per-sample teacher / fake-score timesteps. With two experts, one shared draw per global
        micro-step picks the expert for the whole micro-batch on every rank (ZeRO-3 gathers are
        collective), and the samples spread over that expert's range: t stays distributed as
        without experts."""
        d = self.dmd
        u = self.rng.rand(batch.positions.tolist(), purpose, phase)
        if self.boundary_ratio is None:
            return flow.sample_score_timesteps(u, d.flow_shift, d.min_timestep_ratio, d.max_timestep_ratio)
        shared = float(self.rng.rand([batch.micro_step], purpose, phase, sub=1))
        return flow.expert_score_timesteps(u, shared, self.boundary_ratio, d.flow_shift, d.min_timestep_ratio,
                                           d.max_timestep_ratio)

    def generator_step_indices(self, batch: Batch, phase: int) -> torch.Tensor:
        """Per-sample entries of the denoising-step list. With two experts, the expert is drawn once
        per global micro-step (with probability proportional to its number of steps), then each
        sample takes one of its steps: every step stays equally likely."""
        pos = batch.positions.tolist()
        first, n = self.first_trained_step, len(self.steps)
        if self.boundary_ratio is None:
            return first + self.rng.randint(pos, n - first, Purpose.GEN_STEP_INDEX, phase)
        high = [i for i in range(first, n) if self.steps[i] >= self.boundary_ratio * 1000]
        low = [i for i in range(first, n) if i not in high]
        shared = float(self.rng.rand([batch.micro_step], Purpose.GEN_STEP_INDEX, phase, sub=1))
        side = high if shared < len(high) / (n - first) else low
        pick = self.rng.randint(pos, len(side), Purpose.GEN_STEP_INDEX, phase)
        return torch.tensor(side, device=pick.device)[pick]

    # --- the two updates -----------------------------------------------------------------------
    def dmd_loss(self, x0_gen: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The generator's DMD loss; also returns the normalized direction ``grad``."""
        pos = batch.positions.tolist()
        with torch.no_grad():
            t = self.score_timesteps(batch, Purpose.DMD_TIMESTEP, PHASE_GENERATOR)
            eps = self.rng.randn(pos, x0_gen.shape[1:], Purpose.DMD_NOISE, PHASE_GENERATOR)
            sigma = flow.sigma_from_t(t)
            x_t = flow.add_noise(x0_gen.detach(), eps, sigma)
            v_fake = predict_velocity(self.models.fake_score.module, x_t, t, batch.text_embeds,
                                      self.models.dtype, **self.conditioning(batch))
            x0_fake = flow.x0_from_velocity(x_t, v_fake, sigma)
            if self.dmd.real_score_only:
                # s_fake - s_real = (1 - sigma)(x0_fake - x0_real) / sigma^2; with s_fake = 0 the
                # same expression holds for x0_fake = x_t / (1 - sigma)
                x0_fake = losses.real_score_only_x0(x_t, sigma)
            x0_real = self.teacher_x0(x_t, t, batch)
            # before dmd_grad's nan_to_num, which would hide them (guard.py)
            self.guard.check("teacher x0", x0_real)
            self.guard.check("fake_score x0", x0_fake)
            grad = losses.dmd_grad(x0_gen.detach(), x0_real, x0_fake, self.dmd.grad_norm_mean)
        loss = losses.dmd_loss(x0_gen, grad)
        return loss, grad, {"stats/dmd_timestep": t.mean(), "stats/dmd_grad_abs_mean": grad.abs().mean()}

    def gan_block(self) -> int:
        b = self.dmd.gan.block_index
        return self.models.fake_score.module.config.num_layers // 2 if b is None else b

    def gan_timesteps(self, batch: Batch, phase: int) -> torch.Tensor:
        """Per-sample timesteps where the GAN head judges (gan.judge_timesteps: dmd.gan.timestep_range;
        with two experts, one shared draw per global micro-step picks the expert)."""
        lo, hi = self.dmd.gan.timestep_range
        u = self.rng.rand(batch.positions.tolist(), Purpose.GAN_TIMESTEP, phase)
        shared = 0.0
        if self.boundary_ratio is not None:
            shared = float(self.rng.rand([batch.micro_step], Purpose.GAN_TIMESTEP, phase, sub=1))
        return gan.judge_timesteps(u, lo, hi, self.boundary_ratio, shared)

    def discriminator_inputs(self, batch: Batch, x0_gen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's ``[2B]`` inputs (gan.judge_inputs: each real latent and the generated sample of
        its prompt share one timestep and noise draw) and their timesteps."""
        t = self.gan_timesteps(batch, PHASE_FAKE_SCORE)
        eps = self.rng.randn(batch.positions.tolist(), x0_gen.shape[1:], Purpose.GAN_NOISE, PHASE_FAKE_SCORE)
        return gan.judge_inputs(batch.latents, x0_gen, eps, t), torch.cat([t, t])

    def discriminator_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's loss on ``[real, generated]`` logits; its accuracy and logits go to the window."""
        real, fake = logits.chunk(2)
        for k, v in gan.discriminator_stats(real, fake).items():
            self.window.add(k, v)
        return gan.discriminator_loss(real, fake)

    def gan_generator_loss(self, x0_gen: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The generator's non-saturating GAN loss on its noised samples (gan.generator_gan_loss
        freezes the fake score, so the gradient reaches the generator through x0_gen only)."""
        pos = batch.positions.tolist()
        t = self.gan_timesteps(batch, PHASE_GENERATOR)
        eps = self.rng.randn(pos, x0_gen.shape[1:], Purpose.GAN_NOISE, PHASE_GENERATOR)
        x_t = flow.add_noise(x0_gen, eps, flow.sigma_from_t(t))
        return gan.generator_gan_loss(self.models.fake_score.module, self.gan_block(), x_t, t,
                                      batch.text_embeds, self.models.dtype, **self.conditioning(batch))

    def regression_batch(self, batch: Batch) -> Batch:
        """The regression pairs of this micro-step: the m-th micro-batch of their own stream (its
        own permutation, even over the training data), so resuming needs no extra state."""
        src = self.regression_data
        return src.collate(src.positions_for(batch.micro_step), batch.micro_step)

    def regression_x0(self, rb: Batch) -> torch.Tensor:
        """DMD v1's regression (dmd/regression.py): the generator's chain from each pair's stored
        noise, re-noised with draws keyed by the pair's dataset index."""
        keys, shape = rb.indices.tolist(), rb.latents.shape[1:]
        renoise = lambda i: self.rng.randn(keys, shape, Purpose.REG_RENOISE, sub=i)  # noqa: E731
        return regression.chain_x0(self.velocity_fn(self.models.generator, rb),
                                   self.steps[:self.regression_steps], rb.noise, renoise)

    def regression_loss(self, batch: Batch) -> torch.Tensor:
        """The regression loss of this micro-step's pairs, in forwards of its own."""
        rb = self.regression_batch(batch)
        return regression.regression_loss(self.regression_x0(rb), rb.latents)

    @property
    def regression_steps(self) -> int:
        return self.dmd.regression.num_steps or len(self.steps)

    def generator_forward(self, batch: Batch) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, Batch]]]:
        """The generator update's forwards with grad: the x0 the DMD loss judges and, with
        dmd.regression on, the regression's x0 with its pairs. When the regression trains one
        step (num_steps 1) and both inputs stack, the two are one engine call: the generator's
        blocks then run once per backward (fewer ZeRO-3 hook calls, and what leaf blocks need)."""
        engine = self.models.generator
        x, t = self.generator_input(batch, PHASE_GENERATOR)
        if not self.dmd.regression.weight:
            return self.x0_at(engine, batch, x, t), None
        rb = self.regression_batch(batch)
        if self.regression_steps != 1 or not stackable(batch, rb):
            if has_leaf_blocks(engine.module):  # zero.leaf_block_roles rules out num_steps > 1
                raise RuntimeError("the regression pairs' conditioning (text length or image inputs) differs from the "
                                   "training data's, so the generator would run twice per backward, which its "
                                   "ZeRO-3 leaf blocks cannot; set deepspeed.leaf_blocks=false")
            return self.x0_at(engine, batch, x, t), (self.regression_x0(rb), rb)
        t_reg = torch.full((rb.size,), float(self.steps[0]), device=x.device)
        both = stack_conditioning(batch, rb)
        v = self.velocity_fn(engine, both)(torch.cat([x, rb.noise.to(x.dtype)]), torch.cat([t, t_reg]))
        v_gen, v_reg = v.split([x.shape[0], rb.size])
        x0 = flow.x0_from_velocity(x, v_gen, flow.sigma_from_t(t))
        return x0, (flow.x0_from_velocity(rb.noise, v_reg, flow.sigma_from_t(t_reg)), rb)

    @contextmanager
    def guarded_update(self, role: str):
        """One role's update under the non-finite guard (guard.py). The scalars it logs are held
        apart and kept only if the update is applied, so the logged means describe applied
        updates (a dropped update's NaN loss would turn them into NaN); ``.applied`` says which."""
        update = SimpleNamespace(applied=False)
        self.guard.begin()
        main, self.window = self.window, ScalarWindow()
        try:
            yield update
        finally:
            staged, self.window = self.window, main
        update.applied = self.guard.finish(role, self.models.engine(role), self.current_step, self.state)
        if update.applied:
            self.window.merge(staged)

    def backward_and_step(self, engine, role: str, loss: torch.Tensor) -> None:
        """One micro-batch's backward and step, the loss passed through the guard's gate."""
        engine.backward(self.guard.gate(loss, engine.is_gradient_accumulation_boundary(), role, self.current_step))
        restrict_step_to_used_experts(engine)
        engine.step()

    def generator_step(self, batches: list[Batch]) -> None:
        engine = self.models.generator
        histograms = {}
        with self.guarded_update("generator") as update:
            for batch in batches:
                self.guard.check_batch(batch)
                x0_gen, reg = self.generator_forward(batch)
                self.guard.check("generator output", x0_gen)
                loss, grad, stats = self.dmd_loss(x0_gen, batch)
                if self.cfg.logging.histograms and self.writer.enabled:
                    histograms = {"stats/x0_generator": x0_gen.detach(), "stats/dmd_grad": grad}
                if self.dmd.gan.enabled or self.dmd.regression.weight:
                    self.window.add("loss/generator_dmd", loss.detach())
                if self.dmd.gan.enabled:
                    g_loss = self.gan_generator_loss(x0_gen, batch)
                    loss = loss + self.dmd.gan.generator_weight * g_loss
                    self.window.add("loss/generator_gan", g_loss.detach())
                if reg is not None:
                    r_loss = regression.regression_loss(reg[0], reg[1].latents)
                    loss = loss + self.dmd.regression.weight * r_loss
                    self.window.add("loss/generator_regression", r_loss.detach())
                self.backward_and_step(engine, "generator", loss)
                self.window.add("loss/generator", loss.detach())
                for k, v in stats.items():
                    self.window.add(k, v)
            self.window.add("grad_norm/generator", _grad_norm(engine))
            self.window.add("lr/generator", engine.get_lr()[0])
        if update.applied:
            self.histograms.update(histograms)  # a dropped update's tensors may hold NaN
        if update.applied and self.ema is not None:
            self.ema.update(self.current_step)

    def fake_score_loss(self, batch: Batch) -> torch.Tensor:
        """Flow matching on a fresh generator sample; with the GAN term, plus the discriminator's
        loss on the same samples against the batch's real latents (fake_score_forward)."""
        pos = batch.positions.tolist()
        with torch.no_grad():
            x0_gen = self.generator_x0(self.models.generator.module, batch, PHASE_FAKE_SCORE)
        self.guard.check("generator output", x0_gen)
        t = self.score_timesteps(batch, Purpose.FAKE_TIMESTEP, PHASE_FAKE_SCORE)
        eps = self.rng.randn(pos, x0_gen.shape[1:], Purpose.FAKE_NOISE, PHASE_FAKE_SCORE)
        x_t = flow.add_noise(x0_gen, eps, flow.sigma_from_t(t))
        self.window.add("stats/x0_generator_mean", x0_gen.mean())
        self.window.add("stats/x0_generator_std", x0_gen.std())
        v_pred, logits = self.fake_score_forward(batch, x_t, t, x0_gen)
        denoise = losses.fake_score_loss(v_pred, eps, x0_gen)
        if logits is None:
            return denoise
        d_loss = self.discriminator_loss(logits)
        self.window.add("loss/fake_score_denoise", denoise.detach())
        self.window.add("loss/discriminator", d_loss.detach())
        return denoise + self.dmd.gan.discriminator_weight * d_loss

    def fake_score_forward(self, batch: Batch, x_t: torch.Tensor, t: torch.Tensor,
                           x0_gen: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The fake score's velocity at ``(x_t, t)`` and, with the GAN term, the head's logits on
        ``discriminator_inputs``. With one expert the two are one engine call on ``[3B]`` inputs (the
        head reads all of them and keeps the last 2B), so the fake score's blocks run once per
        backward, as ZeRO-3 leaf blocks need (zero.leaf_block_roles). A two-expert fake score makes
        two calls: the GAN timesteps may fall on the other expert than the denoising ones."""
        engine, dtype, b = self.models.fake_score, self.models.dtype, x_t.shape[0]
        if not self.dmd.gan.enabled:
            return self.velocity_fn(engine, batch)(x_t, t), None
        x_d, t_d = self.discriminator_inputs(batch, x0_gen)
        if not self.fake_score_one_call:
            v_pred = self.velocity_fn(engine, batch)(x_t, t)
            with gan.head_logits(engine.module, self.gan_block()) as out:
                predict_velocity(engine, x_d, t_d, torch.cat([batch.text_embeds] * 2), dtype,
                                 **self.conditioning(batch, repeat=2))
            return v_pred, out["logits"]
        with gan.head_logits(engine.module, self.gan_block()) as out:
            v = predict_velocity(engine, torch.cat([x_t, x_d]), torch.cat([t, t_d]),
                                 torch.cat([batch.text_embeds] * 3), dtype, **self.conditioning(batch, repeat=3))
        return v[:b], out["logits"][b:]

    def fake_score_step(self, batches: list[Batch]) -> None:
        engine = self.models.fake_score
        with self.guarded_update("fake_score"):
            for batch in batches:
                self.guard.check_batch(batch)
                loss = self.fake_score_loss(batch)
                self.backward_and_step(engine, "fake_score", loss)
                self.window.add("loss/fake_score", loss.detach())
            self.window.add("grad_norm/fake_score", _grad_norm(engine))
            self.window.add("lr/fake_score", engine.get_lr()[0])

    # --- the loop ------------------------------------------------------------------------------
    def is_generator_iteration(self, step: int) -> bool:
        return step % self.dmd.generator_update_interval == 0

    def train_step(self, step: int) -> None:
        self.current_step = step  # the iteration being run; state.step counts finished ones
        if self.vsa is not None:
            a = self.cfg.attention
            self.vsa.sparsity = vsa_sparsity_at(step, a.vsa_sparsity, a.vsa_decay_rate, a.vsa_decay_interval_steps)
            self.window.add("attention/vsa_sparsity", self.vsa.sparsity)
        batches = [self.data.next() for _ in range(self.cfg.train.grad_accum_steps)]
        if self.is_generator_iteration(step):
            self.generator_step(batches)
        self.fake_score_step(batches)

    def train(self) -> None:
        max_steps = self.cfg.train.max_steps
        timer = StepTimer()
        t_start = time.perf_counter()
        first = self.state.step + 1
        samples_per_step = (self.pstate.dp_size * self.cfg.train.micro_batch_size
                            * self.cfg.train.grad_accum_steps)
        # a bar on a terminal only: in logs the line of every logging interval is the progress
        bar = progress(max_steps, "train", unit="it", rank=self.pstate.rank, plain=False, initial=self.state.step)
        for step in range(first, max_steps + 1):
            timer.start()
            try:
                self.train_step(step)
            except NonFiniteError:
                # every rank stops here together (the guard's decision is world-wide): log what
                # the window holds, with the skip counts, before the error reaches the user
                self.log_window(step, 0.0)
                self.writer.flush()
                raise
            dt = timer.stop(self.device)
            self.state.step = step
            self.window.add("time/step_s", dt)
            self.window.add("throughput/samples_per_s", samples_per_step / max(dt, 1e-9))
            bar.update(1)
            if step % self.cfg.logging.interval_steps == 0 or step == max_steps:
                self.log_window(step, (time.perf_counter() - t_start) / (step - first + 1) * (max_steps - step))
            for hook in self.hooks:
                hook(self)
            if self.preemption is not None and self.preemption.any_rank(self.pstate.world_group):
                self.preempted = True
                log.info("preemption signal received: stopping after iteration %d", step)
                break
        bar.close()
        self.writer.flush()

    def log_window(self, step: int, eta_s: float) -> None:
        values = self.window.reduce(self.pstate.world_group)
        values.update(memory_stats(self.device))
        values.update(skip_counts(self.state))
        self.history.append((step, values))
        self.writer.scalars(values, step)
        for tag, tensor in self.histograms.items():
            self.writer.histogram(tag, tensor, step)
        self.histograms = {}
        log.info(format_line(step, self.cfg.train.max_steps, values, eta_s))


def _grad_norm(engine) -> float:
    """The global gradient norm DeepSpeed computed at its last step (before clipping)."""
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
