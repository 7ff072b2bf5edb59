"""``megadmd plan``: a DMD2 run on paper, before a queue slot is spent: per-rank memory
(memory.py), FLOPs and time (compute.py), both from a run's own config (run.py)."""
from .compute import GPUS, ForwardFlops, LoopSettings, RoleCompute, TimePlan, WanShape, plan_time, wan_forward_flops
from .memory import (ActivationShape, MemoryPlan, WanParams, ZeroSettings, default_zero_settings, format_plan,
                     plan_memory, train_bytes, wan_params)
from .run import PlanFlags, RunPlan, format_run_plan, plan_run

__all__ = [
    "GPUS", "ActivationShape", "ForwardFlops", "LoopSettings", "MemoryPlan", "PlanFlags", "RoleCompute", "RunPlan",
    "TimePlan", "WanParams", "WanShape", "ZeroSettings", "default_zero_settings", "format_plan", "format_run_plan",
    "plan_memory", "plan_run", "plan_time", "train_bytes", "wan_forward_flops", "wan_params",
]
