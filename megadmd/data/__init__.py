"""Data: the synthetic-latent dataset format, the training loader, and dataset makers."""
