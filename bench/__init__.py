"""Benchmarks: commands that print tables (targets are reported, never asserted)."""
