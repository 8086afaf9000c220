"""Benchmarks of EMC on the built-in model organism (run each file as a script)."""
