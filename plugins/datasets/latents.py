"""Plugin `latents` (being written this session)."""
