"""Attention for Wan DiTs: the self-attention processor (dense, Ulysses, VSA), VSA and its
backends, and ``enable_vsa`` for sampling a VSA-distilled model inside diffusers."""
from .inference import enable_vsa

__all__ = ["enable_vsa"]
