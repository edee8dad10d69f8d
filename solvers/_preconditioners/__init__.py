"""Preconditioners: classic (lineax operators) and learned (Equinox modules)."""
