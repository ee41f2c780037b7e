"""Plugin `tile` (being written this session)."""
