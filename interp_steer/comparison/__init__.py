"""Comparison: every method swept to one coherence budget, the report and its figures."""
