"""Rollouts: commands (what operators ask), the engine (what happens on its own)."""
