"""Plugin `vsa` (being written this session)."""
