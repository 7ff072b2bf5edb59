"""LoRA distillation: one frozen base serving the three roles, the trainable roles' adapters in their own engines, and their export."""
