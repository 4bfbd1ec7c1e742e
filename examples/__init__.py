"""Example models, presets and the embedded default corpus (installed as mtc.examples)."""
