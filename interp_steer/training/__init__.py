"""Training: the loop and its objectives, one process or many (torchrun)."""
