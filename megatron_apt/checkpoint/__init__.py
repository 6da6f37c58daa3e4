"""Checkpoint formats and key maps (diffusers interop grows here)."""
