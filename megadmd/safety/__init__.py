"""Protecting what users made: output-folder rules, the one-run-per-folder lock, content hashes
of checkpoint files, and the checks a resumed run must pass (docs/checkpoints.md)."""
