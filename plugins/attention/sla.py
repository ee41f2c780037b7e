"""Plugin `sla` (being written this session)."""
