"""Distillation of new tiny autoencoders from any teacher in flax_vae (see README, "Distillation")."""
