"""Non-finite guards of the training loop (``train.nonfinite``): detect, agree, drop, count, stop.

One role's update (generator or fake_score, over its ``grad_accum_steps`` micro-batches) is bad
when, on any rank, a non-finite value shows in
- its batch (latents, text embeddings, image conditions),
- the generator's output,
- the teacher's or the fake score's x0 prediction (checked *before* ``losses.dmd_grad``'s
  ``nan_to_num``, which would otherwise turn a NaN teacher into a zero direction, a zero loss
  and a zero gradient that trains on nothing and says nothing -- a deliberate difference from
  FastVideo, which keeps the ``nan_to_num`` and no check),
- the loss,
or when DeepSpeed itself finds the gradient norm non-finite and skips the step (read back from
the engine's ``was_step_applied()``, never assumed).

The ranks agree before the boundary step: one all-reduce (MAX) of a few flags over the world
group, so every rank takes the same decision (ZeRO-3's step is collective). A bad update is
then dropped through DeepSpeed's own overflow path, the one fp16 loss scaling relies on: the
boundary micro-batch's loss is multiplied by NaN, its gradients become non-finite on every rank,
and ZeRO-3 discards the accumulated gradients without touching the parameters, the Adam moments
or the LR schedule (``engine.skipped_steps`` counts it). This keeps every rank in the same
forward/backward/step sequence, so no collective is left waiting, whatever the accumulation.

``skip`` (the default) counts the update in ``TrainState.<role>_skipped`` and in
``health/skipped_steps``, logs one warning line, and carries on; after
``train.max_consecutive_skips`` skipped updates of one role in a row the run stops, since
nothing is being learnt any more. ``stop`` halts at the first bad update. A stop raises
``NonFiniteError`` (exit status 2 from the CLI) before the hooks run, so no checkpoint of the
iteration is written; the engines still hold the last applied update.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..roles import recover_from_skipped_step

log = logging.getLogger("megadmd")

# What is checked, in the order the flags travel in the all-reduce (the same on every rank).
CHECKS = ("batch", "generator output", "teacher x0", "fake_score x0", "loss")
GRADIENT = "gradient norm (DeepSpeed skipped the step)"


class NonFiniteError(ConfigError):
    """The run stopped on non-finite values (train.nonfinite=stop, or too many skips in a row).
    A ConfigError so the CLI prints one line and exits with status 2: like bad input, it needs a
    person to fix the data or the recipe before running again (retrying would meet it again)."""


class NonFiniteGuard:
    """Per-update flags, the world-wide decision, and the applied/skipped bookkeeping."""

    def __init__(self, mode: str, max_consecutive_skips: int, group=None):
        self.mode = mode
        self.max_consecutive_skips = max_consecutive_skips
        self.group = group  # the world group: every rank runs every role's update
        self.consecutive = {"generator": 0, "fake_score": 0}
        self._flags: dict[str, torch.Tensor] = {}
        self.found: list[str] = []  # what the ranks agreed was non-finite in the current update

    def begin(self) -> None:
        self._flags = {}
        self.found = []

    def check(self, what: str, *tensors: Optional[torch.Tensor]) -> None:
        """Record whether any of ``tensors`` holds NaN or infinity (no host sync here)."""
        for t in tensors:
            if t is None:
                continue
            bad = ~torch.isfinite(t.detach()).all()
            prev = self._flags.get(what)
            self._flags[what] = bad if prev is None else prev | bad

    def check_batch(self, batch) -> None:
        self.check("batch", batch.latents, batch.text_embeds, batch.image_latents, batch.image_embeds)

    def gate(self, loss: torch.Tensor, boundary: bool, role: str, step: int) -> torch.Tensor:
        """The loss to back-propagate. At the accumulation boundary the ranks agree; a bad
        update stops the run (``stop``) or gets a NaN loss, so DeepSpeed drops it (``skip``)."""
        self.check("loss", loss)
        if not boundary:
            return loss
        self.found = self._agree()
        if not self.found:
            return loss
        if self.mode == "stop":
            raise NonFiniteError(self._stop_message(role, step, self.found))
        return loss * float("nan")

    def _agree(self) -> list[str]:
        from ..parallel.init import collective_device

        device = next(iter(self._flags.values())).device  # gate() always checks the loss first
        none = torch.zeros((), dtype=torch.bool, device=device)
        flags = torch.stack([self._flags.get(c, none) for c in CHECKS]).to(collective_device(), torch.int32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return [c for c, f in zip(CHECKS, flags.tolist()) if f]

    def finish(self, role: str, engine, step: int, state) -> bool:
        """After the boundary step: whether the update was applied, counted in ``state``.

        DeepSpeed's verdict is read back from the engine. It is the same on every rank: ZeRO-3
        sums the gradient norm over all ranks that hold partitions (the world) before judging it.
        """
        applied = bool(engine.was_step_applied())
        if applied and self.found:
            # the NaN loss did not make DeepSpeed skip: this DeepSpeed no longer drops non-finite
            # steps, and the weights are now garbage. Nothing may be saved from here.
            raise RuntimeError(f"DeepSpeed applied a {role} update with non-finite gradients at iteration "
                               f"{step}; this DeepSpeed version does not skip such steps, which megadmd's "
                               f"non-finite guard relies on")
        if applied:
            setattr(state, f"{role}_updates", getattr(state, f"{role}_updates") + 1)
            self.consecutive[role] = 0
            return True
        what = self.found or [GRADIENT]
        recover_from_skipped_step(engine)
        setattr(state, f"{role}_skipped", getattr(state, f"{role}_skipped") + 1)
        self.consecutive[role] += 1
        if self.mode == "stop":
            raise NonFiniteError(self._stop_message(role, step, what))
        log.warning("iteration %d: %s update skipped, non-finite %s (%d %s updates skipped so far)",
                    step, role, ", ".join(what), getattr(state, f"{role}_skipped"), role)
        cap = self.max_consecutive_skips
        if cap and self.consecutive[role] >= cap:
            raise NonFiniteError(
                f"{cap} {role} updates in a row were skipped for non-finite values (the last at iteration {step}: "
                f"{', '.join(what)}; train.max_consecutive_skips={cap}); nothing is being learnt: check the data "
                f"(NaN or infinite samples), the learning rate and dmd.guidance_scale")
        return False

    @staticmethod
    def _stop_message(role: str, step: int, what: list[str]) -> str:
        return (f"non-finite {', '.join(what)} in the {role} update of iteration {step} (train.nonfinite=stop): "
                f"the update was not applied and nothing was saved after it; check the data (NaN or infinite "
                f"samples), the learning rate and dmd.guidance_scale, or set train.nonfinite=skip")


def skip_counts(state) -> dict[str, float]:
    """TensorBoard scalars of the skipped updates so far (cumulative; the same on every rank)."""
    g, f = state.generator_skipped, state.fake_score_skipped
    return {"health/skipped_steps": float(g + f), "health/skipped_steps/generator": float(g),
            "health/skipped_steps/fake_score": float(f)}
