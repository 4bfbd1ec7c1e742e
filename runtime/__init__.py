"""mtc.runtime."""
