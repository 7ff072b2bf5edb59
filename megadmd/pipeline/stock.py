"""The run's DMD steps as a stock diffusers ``FlowMatchEulerDiscreteScheduler``, so that an export
loads with diffusers alone; and the noise convention of sampling with it.

With ``stochastic_sampling=True`` that scheduler's ``step`` is the DMD step (x0 = x - sigma * v,
then fresh noise to the next sigma; the last step's next sigma is 0, so it returns x0). Its
``set_timesteps(N)`` (diffusers 0.42) takes ``u = linspace(1, m, N)`` with ``m`` the shifted
``1 / 1000``, shifts it, ``s * u / (1 + (s - 1) * u)``, then stretches it so the last sigma is
``shift_terminal``: ``sigma -> 1 - (1 - sigma) * (1 - T) / (1 - sigma_last)``. Both maps fix
sigma = 1, so the first step is always 1000, the last is ``1000 * T``, and the shift places the
ones between. Three steps from 1000 are therefore always reachable (the middle one fixes the
shift: ``fit_stock_scheduler`` finds it by bisection in float64), and so is any list that is a
shift-warped linear list (both maps are Moebius maps fixing 1, so their composition is one as
well): linear lists (shift 1), and the warped lists ``dmd.warp_denoising_step`` makes from them,
e.g. the A14B preset's [1000, 750, 500, 250] warped at shift 12. A list is accepted only when the
scheduler itself, built from the fitted config, gives its steps within ``TOLERANCE``.

Unlike ``DMDScheduler`` the stock scheduler derives its steps from ``num_inference_steps``: the
pipeline must be called with the run's N. Another N gives N steps on the same curve from 1000 down
to the same last step (steps the generator never trained at; N = 1 gives NaN timesteps).

Noise: ``WanPipeline`` does not pass its generator to ``scheduler.step``, so the scheduler draws
each re-noise from the global RNG of the latents' device, in float32. ``torch.manual_seed(seed)``
right before ``pipe(...)`` with no ``generator`` fixes every draw of a call: the starting latent
and then each step's re-noise, all from that one stream. (A ``generator`` seeded with the same
number must not be added: a CPU generator and the CPU global RNG seeded alike draw the same
numbers, so the first re-noise would repeat the starting latent.) ``diffusers_noise`` reproduces
it for ``megadmd generate --noise diffusers``.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Sequence

import torch

from .. import flow

TOLERANCE = 1e-3  # max |timestep difference| accepted, in timestep units (0..1000); float32 rounding is ~6e-5
STOCK_CLASS = "FlowMatchEulerDiscreteScheduler"


def stock_scheduler(config: dict):
    """The stock scheduler of a fitted config (``fit_stock_scheduler``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


def stock_timesteps(config: dict, num_steps: int) -> list[float]:
    """What the stock scheduler samples at with ``num_inference_steps=num_steps``."""
    scheduler = stock_scheduler(config)
    with warnings.catch_warnings():  # a degenerate stretch (1 step, or a last step of 1000) divides 0 by 0
        warnings.simplefilter("ignore", RuntimeWarning)
        scheduler.set_timesteps(num_steps)
    return [float(t) for t in scheduler.timesteps]


def fit_stock_scheduler(timesteps: Sequence[float]) -> tuple[Optional[dict], str]:
    """``(config, "")`` for a ``FlowMatchEulerDiscreteScheduler`` that samples ``timesteps`` (as
    ``set_timesteps(len(timesteps))`` gives them, within ``TOLERANCE``), or ``(None, why not)``."""
    steps = [float(t) for t in timesteps]
    n = len(steps)
    top = float(flow.NUM_TRAIN_TIMESTEPS)
    if abs(steps[0] - top) > TOLERANCE:
        return None, f"its first step is {steps[0]:g}, and the stock scheduler always starts at {top:g}"
    if any(a == b for a, b in zip(steps, steps[1:])):
        return None, "it repeats a step"
    base = {"num_train_timesteps": flow.NUM_TRAIN_TIMESTEPS, "stochastic_sampling": True}
    if n == 1:
        candidates = [{"shift": 1.0, "shift_terminal": None}]
    else:
        terminal = steps[-1] / top
        candidates = [{"shift": 1.0, "shift_terminal": terminal}]  # linear lists
        shift = _solve_shift(steps[1] / top, terminal, n) if n >= 3 else None
        if shift is not None:
            candidates.append({"shift": shift, "shift_terminal": terminal})
    worst = math.inf
    for c in candidates:
        errors = [abs(a - b) for a, b in zip(stock_timesteps({**base, **c}, n), steps)]
        err = math.inf if any(math.isnan(e) for e in errors) else max(errors)
        if err < TOLERANCE:
            return {**base, **c}, ""
        worst = min(worst, err)
    return None, (f"no shift and shift_terminal give these {n} steps (closest: {worst:.3g} timesteps off; "
                  f"tolerance {TOLERANCE:g})")


def _stock_ratio(shift: float, n: int) -> float:
    """``(1 - sigma_1) / (1 - sigma_last)`` of the stock schedule before the stretch, which the
    stretch keeps: the second step's place between 1000 and the last step, as a function of the
    shift (float64, with ``m`` rounded to float32 as the scheduler stores it)."""
    m = float(torch.tensor(shift * 1e-3 / (1 + (shift - 1) * 1e-3), dtype=torch.float32))
    u1 = 1 - (1 - m) / (n - 1)
    w1 = shift * u1 / (1 + (shift - 1) * u1)
    w_last = shift * m / (1 + (shift - 1) * m)
    return (1 - w1) / (1 - w_last)


def _solve_shift(sigma_1: float, terminal: float, n: int) -> Optional[float]:
    """The smallest shift whose schedule puts the second step at ``sigma_1`` once stretched to end
    at ``terminal``, or None. The ratio is 1 at shift -> 0, 1 / (n - 1) at shift 1, and has one
    minimum above 1 (near shift 33 for 3 to 5 steps), so the bracket is the first sign change
    on a log grid."""
    if not 0 < terminal < 1 or not terminal < sigma_1 < 1:
        return None
    target = (1 - sigma_1) / (1 - terminal)
    grid = [math.log(1e-4) + k * (math.log(1e4) - math.log(1e-4)) / 2000 for k in range(2001)]
    values = [_stock_ratio(math.exp(x), n) - target for x in grid]
    bracket = next((k for k in range(2000) if (values[k] > 0) != (values[k + 1] > 0)), None)
    if bracket is None:
        return None
    lo, hi, f_lo = grid[bracket], grid[bracket + 1], values[bracket]
    for _ in range(100):
        mid = (lo + hi) / 2
        f_mid = _stock_ratio(math.exp(mid), n) - target
        if (f_mid > 0) == (f_lo > 0):
            lo, f_lo = mid, f_mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def diffusers_noise(seed: int, idx: list, shape: Sequence[int], device) -> tuple[torch.Tensor, Callable]:
    """Samples ``idx`` drawn as ``torch.manual_seed(seed + j); pipe(prompt_j)`` draws them with the
    stock scheduler, each from its own stream on ``device``: (starting latents ``[B, C, F, H, W]``,
    a function giving the next step's re-noise). A device generator seeded ``s`` draws what the
    device's global RNG draws after ``torch.manual_seed(s)``."""
    gens = [torch.Generator(device).manual_seed(seed + j) for j in idx]

    def draw(step: Optional[int] = None) -> torch.Tensor:
        return torch.cat([torch.randn((1, *shape), generator=g, device=device, dtype=torch.float32) for g in gens])

    return draw(), draw
