"""Token-drop strategies (placeholder until implemented)."""
