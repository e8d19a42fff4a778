"""Filled in by its feature."""
COMMANDS: list = []
