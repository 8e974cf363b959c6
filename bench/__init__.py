"""Benchmarks and the GPU check: run from the repository root (``python -m bench.<name>``)."""
