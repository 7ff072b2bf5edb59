"""The shipped model: an exported diffusers pipeline folder, its DMD scheduler and its sampling
metadata (``megadmd_sampling.json``).

Importing this package is what lets diffusers load an exported folder: its ``model_index.json``
names ``["megadmd.pipeline.scheduler", "DMDScheduler"]``, and diffusers resolves a library that
is not its own only from modules already imported (it never imports a module a folder names).
"""
from .scheduler import DMDScheduler

__all__ = ["DMDScheduler"]
