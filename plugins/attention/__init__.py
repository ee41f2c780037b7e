"""Self-attention backends."""
