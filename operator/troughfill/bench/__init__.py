"""Benchmarks: scripts that print JSON (`python -m troughfill.bench.NAME`), not timed tests."""
