"""Benchmarks for Quorum Mesh: `make bench` / `python -m bench` (see bench/README.md)."""
