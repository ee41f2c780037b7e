"""Plugin `sana` (being written this session)."""
