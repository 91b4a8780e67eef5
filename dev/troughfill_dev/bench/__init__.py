"""Benchmarks: scripts that print JSON (`python -m troughfill_dev.bench.NAME`), not timed tests."""
