"""Benchmarks: `python -m bench.generate --out FILE` (text generation vs transformers)."""
