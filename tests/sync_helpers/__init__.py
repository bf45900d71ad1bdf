"""Helpers for the sync tests: a subprocess driver (writer.py). Polling is tests/polling.py's."""
