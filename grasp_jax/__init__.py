"""grasp_jax: pruning at initialization (GraSP and baselines) in JAX."""
