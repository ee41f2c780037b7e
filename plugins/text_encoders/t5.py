"""Plugin `t5` (being written this session)."""
