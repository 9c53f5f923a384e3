"""Whole runs of the runner, the sweep and the examples, in-process where nothing needs a fresh
process (a kill, a signal, a device count or XLA flags)."""
