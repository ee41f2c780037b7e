"""Samplers: noise -> latents."""
