"""The toy problem: a conditional video-latent distribution with known modes (issue 3)."""
