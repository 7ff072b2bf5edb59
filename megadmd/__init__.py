"""megadmd: DMD2 distillation of Wan-style flow-matching video DiTs on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
