"""Helpers shared by the tests: paths, tiny models, fake datasets, data and run helpers."""
