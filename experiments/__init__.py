"""Experiment definitions and the entry point (`python -m experiments.run`)."""
