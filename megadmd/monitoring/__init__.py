"""What an operator sees: the console (log lines, known third-party warnings filtered, progress
bars), the tracking backends behind ``metrics.MetricsWriter`` (TensorBoard, Weights & Biases), and
the label-free sample statistics (diversity.py: spread and saturation where no modes are known)."""
