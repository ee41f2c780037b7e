"""Autoencoders: video <-> latents."""
