"""LoRA adapters over one frozen, ZeRO-3-partitioned base shared by the three roles (docs/lora.md).

With ``model.lora`` the base Wan DiT exists once per rank, in the teacher's ZeRO-3 inference
engine, whose module is a ``SharedBase``: the base itself (the teacher: adapters off) and, for
each LoRA role, a view of it -- other module objects over the same parameter tensors.

A trainable role's engine module is a ``LoRARole``. Its registered submodules are the role's own
trainable parameters -- one ``LoRALayer`` (``lora_A``, ``lora_B``) per target Linear of the base,
plus the generator's VSA gates or the fake score's GAN head -- so they live in the role's own
DeepSpeed engine (optimizer, LR schedule, clipping, checkpoint). The base is held by reference and
never registered: no ``nn.Parameter`` is shared between engines (deepspeed-notes.md).

Injection: a forward hook on each target Linear of the role's view adds
``lora_B(lora_A(x)) * alpha / rank``. ``lora_A`` and ``lora_B`` are called as modules, so the role
engine's ZeRO-3 hooks gather their parameters for the forward and again for the backward; the
base's frozen weights, released after each forward, are gathered again for the backward through
the base by the teacher engine's own ZeRO-3 hooks on the view's modules.

Deliberate difference from "LoRA built with peft on the diffusers model" (diffusers' own LoRA
training): peft replaces each target Linear by a ``lora.Linear`` that holds the adapter as a child
of the base, which would put both roles' adapters into the base's engine -- the teacher's. We keep
peft's configuration and target matching (``LoraConfig``, ``check_target_module_exists``), its
initialization and its state-dict names (``blocks.0.attn1.to_q.lora_A.weight``), and export with
diffusers' own ``save_lora_weights``; tests check these layers against peft's on the same weights.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..config import ConfigError, LoRAConfig
from ..models import WanExperts, is_two_expert

class LoRALayer(nn.Module):
    """``alpha / rank * lora_B(lora_A(x))``: peft's LoRA for one Linear (no dropout, no bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.scaling = alpha / rank
        # peft's init_lora_weights=True: A as nn.Linear's default (Kaiming uniform, a = sqrt 5), B zero,
        # so a fresh adapter leaves the base exactly as it is
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) * self.scaling


def expert_items(model: nn.Module) -> list:
    """``[(name prefix, Wan DiT)]``: ``[("", model)]``, or the two experts with ``high.``/``low.``."""
    if isinstance(model, WanExperts):
        return [(f"{name}.", expert) for name, expert in model.experts().items()]
    return [("", model)]


def alpha_of(lora: LoRAConfig) -> float:
    """``model.lora.alpha``, or the rank when unset (scale 1, diffusers' convention without alphas)."""
    return float(lora.rank if lora.alpha is None else lora.alpha)


def peft_config(rank: int, alpha: float, target_modules: list):
    """LoRA settings as peft's ``LoraConfig``: for target matching, and as the export's metadata."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ConfigError("model.lora needs the peft package: pip install 'megadmd[lora]'") from None

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules))


def target_layers(model: nn.Module, lora: LoRAConfig) -> dict:
    """The Linear layers LoRA adapts, by name (``high.``/``low.`` prefixed for two experts), matched
    by peft against each expert's own names, the names diffusers' loader sees. Raises ConfigError
    when an entry of ``target_modules`` matches no Linear layer (a typo, or a layer this model
    does not have)."""
    config = peft_config(lora.rank, alpha_of(lora), lora.target_modules)  # first: a clear error without peft
    from peft.tuners.tuners_utils import check_target_module_exists

    found: dict = {}
    for prefix, expert in expert_items(model):
        linears = [(n, m) for n, m in expert.named_modules() if n and isinstance(m, nn.Linear)]
        for entry in lora.target_modules:
            if not any(n == entry or n.endswith(f".{entry}") for n, _ in linears):
                kinds = sorted({n.split(".", 2)[2] if n.startswith("blocks.") else n for n, _ in linears})
                raise ConfigError(f"model.lora.target_modules: '{entry}' matches no Linear layer of the model; "
                                  f"its Linear layers are {', '.join(kinds)}")
        for name, module in linears:
            if check_target_module_exists(config, name):
                found[prefix + name] = module
    return found


class _AfterBackward(torch.autograd.Function):
    """Identity whose backward queues ``callback`` to run once the whole backward has finished."""

    @staticmethod
    def forward(ctx, x, callback):
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        torch.autograd.Variable._execution_engine.queue_callback(ctx.callback)
        return grad, None


def _view_of(model: nn.Module) -> nn.Module:
    """A second module tree computing like ``model`` on the very same parameter and buffer
    objects (deep copy with every tensor of ``model`` memoized as itself): no memory, new module
    objects with their own hooks, processors and flags."""
    import copy

    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


class SharedBase(nn.Module):
    """The teacher engine's module in a LoRA run: the base model, and for each LoRA role a view of
    it -- its own module objects over the same (ZeRO-3-partitioned, frozen) parameters.

    Why views rather than one module tree switched between roles: ZeRO-3 keeps per-module
    backward bookkeeping (``ds_grads_remaining`` is reset by every forward of a module, with or
    without grad), so the teacher's no-grad forward between the generator's forward and its
    backward, or the fake score's GAN forward inside the generator's backward, would corrupt it
    (params left gathered through the whole backward, or DeepSpeed's "active_backward_submodules
    is empty" assertion: both measured). A view also carries its role's attention processors
    (the generator's VSA), sequence-parallel hooks and activation checkpointing, so nothing is
    switched at run time. All calls go through ``forward(..., role=...)``, so ZeRO-3's start-of-
    forward hook on this module runs for each of them as for any engine's module.
    """

    def __init__(self, base: nn.Module, roles: tuple):
        super().__init__()
        self.teacher = base
        for role in roles:
            self.add_module(role, _view_of(base))  # before zero.Init: the views share the partitioned tensors
        self.roles = tuple(roles)

    @property
    def config(self):
        return self.teacher.config

    def view(self, role: str) -> nn.Module:
        return getattr(self, role)

    def views(self) -> dict:
        """``{role: module}`` for the teacher and every LoRA role."""
        return {"teacher": self.teacher, **{r: self.view(r) for r in self.roles}}

    def forward(self, *args, role: str = "teacher", expert: Optional[str] = None, **kwargs):
        """The ``role``'s view (the teacher: the base itself), or one ``expert`` of a two-expert view."""
        module = self.view(role)
        return (module if expert is None else getattr(module, expert))(*args, **kwargs)


class LoRARole(nn.Module):
    """A trainable role as its DeepSpeed engine sees it: its adapter (and extra trainable
    modules), computing with its view of the frozen base, which it holds by reference only.

    Parameter names mirror the base (``blocks.0.attn1.to_q.lora_A.weight``; ``high.``/``low.``
    for two experts): peft's names once its adapter name is dropped.
    """

    def __init__(self, role: str, shared: SharedBase, lora: LoRAConfig, seed: int):
        super().__init__()
        object.__setattr__(self, "shared", shared)  # not registered: its parameters are the teacher engine's
        self.role = role
        self.rank, self.alpha = lora.rank, alpha_of(lora)
        self.used: set = set()  # experts run with grad since the last optimizer step (roles.py)
        # the base engine's ZeRO-3 release of what a backward through the base gathered and no
        # module hook released (the view's top-level parameters: its inputs need no grad); set by
        # build_lora_role. Trainable engines do this at the end of their own backward, the
        # teacher's inference engine never runs one, so the role queues it after each backward.
        self.release_backward_leftovers: Optional[Callable[[], None]] = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # identical on every rank
            for name, linear in target_layers(self.lora_base, lora).items():
                layer = LoRALayer(linear.in_features, linear.out_features, self.rank, self.alpha)
                self.add_at(name, layer)
                linear.register_forward_hook(_adds(layer))

    @property
    def lora_base(self) -> nn.Module:
        """This role's view of the base (models.base_of reads it)."""
        return self.shared.view(self.role)

    @property
    def config(self):
        return self.shared.config

    @property
    def megadmd_sequence_context(self):
        return getattr(self.lora_base, "megadmd_sequence_context", None)

    def add_at(self, path: str, module: nn.Module) -> None:
        """Register ``module`` under a dotted path, creating empty containers on the way."""
        *parents, leaf = path.split(".")
        node: nn.Module = self
        for part in parents:
            child = node._modules.get(part)
            if child is None:
                child = nn.Module()
                node.add_module(part, child)
            node = child
        node.add_module(leaf, module)

    def layers(self) -> dict:
        """``{name: LoRALayer}`` in the base's names."""
        return {n: m for n, m in self.named_modules() if isinstance(m, LoRALayer)}

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                return_dict: bool = False, **kwargs):
        expert = None
        if is_two_expert(self):
            hit = self.lora_base.experts_hit(timestep)
            if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
                self.used.update(hit)
            expert = hit[0] if len(hit) == 1 else None  # a mixed batch (inference) goes through WanExperts
        # Keyword arguments only, down to the Wan DiT: ZeRO-3 wraps a module's positional tensor
        # inputs for its post-backward release, which then fires even when the module's output gets
        # no gradient -- the fake score's in the generator's GAN loss, which reads a block's tokens --
        # and DeepSpeed asserts (its pre-backward never ran). What the top module gathered for a
        # backward is released by ``release_backward_leftovers`` below.
        out = self.shared(role=self.role, expert=expert, hidden_states=hidden_states, timestep=timestep,
                          encoder_hidden_states=encoder_hidden_states,
                          encoder_hidden_states_image=encoder_hidden_states_image, return_dict=return_dict, **kwargs)
        release = self.release_backward_leftovers
        if release is None or not torch.is_grad_enabled():
            return out
        if isinstance(out, tuple):
            return (_AfterBackward.apply(out[0], release), *out[1:])
        out.sample = _AfterBackward.apply(out.sample, release)  # return_dict=True
        return out


def _adds(layer: LoRALayer):
    """The forward hook that adds ``layer``'s output to its base Linear's. ``layer`` is called as
    a module, so its engine's ZeRO-3 hooks gather ``lora_A`` and ``lora_B`` in forward and backward."""
    def hook(_linear, args, output):
        return output + layer(args[0])

    return hook
