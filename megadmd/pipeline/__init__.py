"""The shipped model: an exported diffusers pipeline folder, its DMD scheduler and its sampling
metadata (``megadmd_sampling.json``).

Importing this package is what lets diffusers load an exported folder: its ``model_index.json``
names ``["megadmd.pipeline.scheduler", "DMDScheduler"]``, and recent diffusers (0.42) resolve a
library that is not their own only from modules already imported (they never import a module a
folder names; older versions did).
"""
from .scheduler import DMDScheduler

__all__ = ["DMDScheduler"]
