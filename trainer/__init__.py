"""Training entry points: CLI, strategies and callbacks."""
