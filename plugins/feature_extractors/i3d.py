"""Plugin `i3d` (being written this session)."""
