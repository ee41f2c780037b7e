"""Plugin `captions` (being written this session)."""
