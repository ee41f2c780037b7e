"""Text encoders: captions -> token embeddings."""
