"""Distillation (survey §3.2): students and reward models trained by one envelope, one loop and the losses."""
