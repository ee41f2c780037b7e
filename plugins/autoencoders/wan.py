"""Plugin `wan` (being written this session)."""
