"""The shipped model: an exported diffusers pipeline folder, its scheduler (diffusers' own
``FlowMatchEulerDiscreteScheduler`` where it can hold the run's steps, else our ``DMDScheduler``)
and its sampling metadata (``megadmd_sampling.json``).

An export with the stock scheduler loads with diffusers alone. Importing this package is what
lets diffusers load a folder naming ``["megadmd.pipeline.scheduler", "DMDScheduler"]`` (an export
whose steps the stock class cannot hold, or a pipeline saved after ``use_dmd_scheduler``): recent
diffusers (0.42) resolve a library that is not their own only from modules already imported
(they never import a module a folder names; older versions did).
"""
from .scheduler import DMDScheduler, use_dmd_scheduler

__all__ = ["DMDScheduler", "use_dmd_scheduler"]
