"""Plugin `video-folder` (being written this session)."""
