"""DMD2: the losses (pure tensors) and the training loop."""
