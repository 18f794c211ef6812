"""Unlearning methods (Q-MUL, baselines, OEU): built in the unlearning issue."""
