"""Parallel layout (dp x sp), process start-up, and Ulysses sequence parallelism."""
