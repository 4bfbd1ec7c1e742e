"""mtc.codegen."""
