"""Plugin `indomain` (being written this session)."""
