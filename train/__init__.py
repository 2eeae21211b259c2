"""Distillation of tiny TAESD-style autoencoders from any flax-vae teacher (see docs/distillation.md)."""
