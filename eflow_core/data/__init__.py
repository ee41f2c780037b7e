"""Data pipeline: batching datasets into latents and conditions; video writers."""
