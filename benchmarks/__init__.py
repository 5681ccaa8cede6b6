"""Benchmarks of the toolkit: run each from the repository root as `python -m benchmarks.NAME` (see the Makefile)."""
