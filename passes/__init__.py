"""mtc.passes."""
