"""Plugin `minilm` (being written this session)."""
