"""Tests of grasp_jax.data, one module per library module."""
