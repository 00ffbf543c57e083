"""Deciding what changed (pure) and making it happen (the coordinator)."""
