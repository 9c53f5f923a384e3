"""Checks of the benchmark scripts that tests can run on CPU."""
