"""Module-level rank bodies for moetx's own multi-rank tests (importable by every rank)."""
