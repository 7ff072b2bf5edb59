"""A user's DeepSpeed JSON merged with megadmd's config: the keys megadmd owns must agree.

megadmd's config owns the batch sizes, the precision, gradient clipping, and the optimizer and
LR scheduler (it builds torch's AdamW and a diffusers schedule itself). A DeepSpeed JSON may still
name them, as a full config written for another trainer does:

- a value equal to megadmd's, or ``"auto"`` (as in Hugging Face's DeepSpeed integration), agrees
  and is replaced by megadmd's value;
- any other value refuses the run with one line naming both values;
- everything else (ZeRO settings, offload, communication, logging, monitors) goes to DeepSpeed
  as written, except other ``"auto"`` values, which DeepSpeed itself rejects: they are left out
  and DeepSpeed's defaults apply.

The ``scheduler`` section agrees only when its params are all ``"auto"``: DeepSpeed's schedules
count optimizer steps and warm up on a log curve by default, so concrete numbers cannot mean the
same as megadmd's iteration-counted ``optim.<role>`` schedule.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from ..config import ConfigError, OptimConfig

OWNED_DS_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "bf16", "fp16", "amp", "torch_autocast", "gradient_clipping", "optimizer", "scheduler",
)
AUTO = "auto"
# DeepSpeed's "Adam" is AdamW unless adam_w_mode is false; megadmd builds torch.optim.AdamW
_ADAMW_TYPES = ("adam", "adamw")


def _agrees(theirs: Any, ours: Any) -> bool:
    if theirs == AUTO:
        return True
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return theirs == ours
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)):
        return abs(float(theirs) - float(ours)) <= 1e-12 * max(1.0, abs(float(ours)))
    if isinstance(ours, (list, tuple)) and isinstance(theirs, (list, tuple)):
        return len(ours) == len(theirs) and all(_agrees(a, b) for a, b in zip(theirs, ours))
    return theirs == ours


class _Merge:
    """One role's merge; ``check`` raises the one-line refusal."""

    def __init__(self, user: dict, source: str, key: str):
        self.user = user
        self.where = f"{key}: DeepSpeed config {source}"

    def check(self, name: str, theirs: Any, ours: Any, our_key: str) -> None:
        if not _agrees(theirs, ours):
            raise ConfigError(f"{self.where} sets {name}={json.dumps(theirs)} but megadmd's {our_key} gives "
                              f"{json.dumps(ours)}; make them agree, set it to \"auto\", or remove it")

    def precision(self, bf16: bool, precision_key: str) -> dict:
        out = {}
        sec = self.user.get("bf16")
        if sec is not None:
            sec = sec if isinstance(sec, dict) else {"enabled": sec}
            self.check("bf16.enabled", sec.get("enabled", False), bf16, precision_key)
            out["bf16"] = {**sec, "enabled": bf16}  # other bf16 options are DeepSpeed tuning
        else:
            out["bf16"] = {"enabled": bf16}
        for name in ("fp16", "amp", "torch_autocast"):  # megadmd never computes through these
            sec = self.user.get(name)
            if sec is None:
                continue
            enabled = sec.get("enabled", False) if isinstance(sec, dict) else sec
            self.check(f"{name}.enabled", enabled, False, precision_key)
        return out

    def optimizer(self, o: OptimConfig, role_key: str) -> None:
        sec = self.user.get("optimizer")
        if sec is None:
            return
        kind = str(sec.get("type", AUTO))
        if kind != AUTO and kind.lower() not in _ADAMW_TYPES:
            raise ConfigError(f"{self.where} sets optimizer.type={kind} but megadmd trains with AdamW "
                              f"(optim.{role_key}); remove the optimizer section or set its type to AdamW")
        params = dict(sec.get("params", {}))
        if params.pop("adam_w_mode", True) is False:
            raise ConfigError(f"{self.where} sets optimizer.params.adam_w_mode=false (Adam with L2) but "
                              f"megadmd trains with AdamW (decoupled weight decay); remove it")
        params.pop("torch_adam", None)  # which AdamW implementation: DeepSpeed's choice, not a value
        ours = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
        for name, value in params.items():
            if name not in ours:
                if value != AUTO:
                    raise ConfigError(f"{self.where} sets optimizer.params.{name}={json.dumps(value)}, which "
                                      f"megadmd's AdamW (optim.{role_key}) has no setting for; remove it")
                continue
            self.check(f"optimizer.params.{name}", value, ours[name], f"optim.{role_key}.{name}")

    def scheduler(self, o: OptimConfig, role_key: str) -> None:
        sec = self.user.get("scheduler")
        if sec is None:
            return
        for name, value in dict(sec.get("params", {})).items():
            if value != AUTO:
                raise ConfigError(
                    f"{self.where} sets scheduler {sec.get('type', '?')} with {name}={json.dumps(value)} but "
                    f"megadmd's schedule is optim.{role_key}.scheduler='{o.scheduler}' (warmup_steps "
                    f"{o.warmup_steps}, in iterations); set the section's params to \"auto\" or remove it")


def _drop_auto(node: Any) -> Any:
    """Other "auto" values (Hugging Face fills e.g. zero_optimization.reduce_bucket_size from the
    model; DeepSpeed itself rejects "auto") are left out, so DeepSpeed's defaults apply."""
    if isinstance(node, dict):
        return {k: _drop_auto(v) for k, v in node.items() if v != AUTO}
    return node


def merge_ds_config(user: dict, *, source: str, key: str, micro_batch: int, grad_accum: int, dp_size: int,
                    bf16: bool, max_grad_norm: float, trainable: bool, optim: Optional[OptimConfig] = None,
                    role: str = "") -> dict:
    """``user`` with megadmd's owned values in place, or ConfigError naming a disagreement.

    ``key`` is the config key that named the file (``deepspeed.generator``); ``optim`` the role's
    optimizer settings (None for the frozen teacher, whose JSON's optimizer and scheduler sections
    are dropped unread).
    """
    m = _Merge(user, source, key)
    owned = {
        "train_micro_batch_size_per_gpu": (micro_batch, "train.micro_batch_size"),
        "gradient_accumulation_steps": (grad_accum, "train.grad_accum_steps"),
        "train_batch_size": (micro_batch * grad_accum * dp_size,
                             f"train.micro_batch_size x train.grad_accum_steps x dp ({dp_size})"),
        "gradient_clipping": (float(max_grad_norm), "train.max_grad_norm"),
    }
    for name, (ours, our_key) in owned.items():
        if name in user:
            m.check(name, user[name], ours, our_key)
    precision = m.precision(bf16, "model.precision")
    if optim is not None:
        m.optimizer(optim, role)
        m.scheduler(optim, role)
    out = _drop_auto({k: v for k, v in user.items() if k not in OWNED_DS_KEYS})
    out.update(precision)
    out.update({k: ours for k, (ours, _) in owned.items() if k != "gradient_clipping"})
    if trainable and max_grad_norm > 0:
        out["gradient_clipping"] = float(max_grad_norm)
    return out
