"""Stored runs: pytest-benchmark's history read back, and written atomically with a fallback."""
