"""Other tools' formats in and out: FastVideo datasets and configs, users' DeepSpeed JSON."""
