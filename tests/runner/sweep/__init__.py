"""Tests of experiments.sweep on synthetic cells and its command line."""
