"""Distillation (survey §3.2): tokenisation shared by every objective, divergence losses, training."""
