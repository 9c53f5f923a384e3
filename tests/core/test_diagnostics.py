"""gradient_flow against explicit math on a tiny model, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import grasp_jax as gj
from grasp_jax.diagnostics import gradient_flow

from tests.helpers.tiny_models import make_batch, mlp_loss, mlp_params


@pytest.mark.slow
def test_gradient_flow_matches_explicit_hessian():
    with jax.enable_x64(True):
        params = mlp_params(jax.random.PRNGKey(0), dtype=jnp.float64)
        batch = make_batch(jax.random.PRNGKey(1), dtype=jnp.float64)
        scores = gj.random_scores(params, jax.random.PRNGKey(2))
        masks = gj.masks_from_scores(scores, 0.5, direction="lowest")
        pruned = gj.apply_masks(params, masks)
        kernels = {n: pruned[n]["kernel"] for n in pruned}
        flat, unravel = ravel_pytree(kernels)
        m = ravel_pytree({n: masks[n]["kernel"].astype(jnp.float64) for n in masks})[0]

        def loss_flat(v):
            full = {n: {"kernel": k, "bias": params[n]["bias"]} for n, k in unravel(v).items()}
            return mlp_loss(full, batch)

        g = jax.grad(loss_flat)(flat) * m
        h = jax.hessian(loss_flat)(flat)
        out = gradient_flow(params, mlp_loss, batch, masks=masks)
        np.testing.assert_allclose(out["loss"], loss_flat(flat), rtol=1e-12)
        np.testing.assert_allclose(out["grad_norm_sq"], g @ g, rtol=1e-10)
        np.testing.assert_allclose(out["gHg"], g @ h @ g, rtol=1e-9)

        dense = gradient_flow(params, mlp_loss, batch)
        g0 = jax.grad(lambda v: mlp_loss(
            {n: {"kernel": k, "bias": params[n]["bias"]} for n, k in unravel(v).items()}, batch))(
            ravel_pytree({n: params[n]["kernel"] for n in params})[0])
        np.testing.assert_allclose(dense["grad_norm_sq"], g0 @ g0, rtol=1e-10)
        assert dense["grad_norm_sq"] != out["grad_norm_sq"]
