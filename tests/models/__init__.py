"""Tests of grasp_jax.models: the paper's networks and the fast CPU convolution."""
