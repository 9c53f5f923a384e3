"""Tests of the core (grasp_jax/*.py), one module per library module."""
