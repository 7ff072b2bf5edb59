"""What an operator sees: the console (log lines, known third-party warnings filtered, progress
bars) and the tracking backends behind ``metrics.MetricsWriter`` (TensorBoard, Weights & Biases)."""
