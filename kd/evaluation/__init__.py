"""Evaluation: the teacher, baselines and students on held-out prompts, and the report."""
