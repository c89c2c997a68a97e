"""Tuning one video: surgery (what is trained), the motion-distillation losses, the training loop, optimizer steps
(plain torch or DeepSpeed ZeRO), frozen-weight precision, compilation, the session that prepares a backbone once
for many videos, and motion-adapter files."""
