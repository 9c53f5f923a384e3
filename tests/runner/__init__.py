"""Tests of the experiment runner's modules (experiments/), in-process and without training."""
