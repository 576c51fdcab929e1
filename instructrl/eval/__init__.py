"""Evaluation helpers: the gold judge's win rates (`judge`), prompts in and
decoded answers out (`answers`), and the plots (`plot`).

Layer 2: imports the core, `rl` and the data layer; the stages use it.
"""
