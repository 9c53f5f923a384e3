"""Scoring a model of one's own: a BatchNorm that reduces over a named axis, and
the gradient-norm-preserving variant of GraSP."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grasp_jax as gj

from tests.helpers.tiny_models import convbn_setup, cut, explicit_over_chunks, prunable_vector


class ConvAxisBN(nn.Module):
    """Flax's ImageNet example builds its BatchNorm with ``axis_name='batch'``."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(3, (3, 3), use_bias=False, param_dtype=x.dtype)(x)
        x = nn.BatchNorm(use_running_average=False, axis_name=self.axis_name,
                         param_dtype=x.dtype)(x)
        return nn.Dense(4, param_dtype=x.dtype)(nn.relu(x).mean(axis=(1, 2)))


def axis_bn_loss(axis_name, batch_stats):
    model = ConvAxisBN(axis_name)

    def loss(params, batch):
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch["x"],
                                mutable=["batch_stats"])
        return gj.cross_entropy_with_temperature(logits, batch["y"], 2.0)

    return loss


def test_batchnorm_over_a_named_axis_scores_eagerly_when_the_axis_is_bound():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(0), (8, 5, 5, 2), jnp.float64)
        batch = {"x": x, "y": jnp.arange(8) % 4}
        variables = ConvAxisBN().init(jax.random.PRNGKey(1), x)
        params, stats = variables["params"], variables["batch_stats"]
        named, plain = axis_bn_loss("batch", stats), axis_bn_loss(None, stats)
        with pytest.raises(NameError, match="batch"):
            gj.grasp_scores(params, named, batch)
        for opts in ({}, {"microbatch_size": 3}, {"microbatch_size": 3, "memory_budget_bytes": 0}):
            want = prunable_vector(gj.grasp_scores(params, plain, batch, **opts))
            got = prunable_vector(gj.grasp_scores(params, named, batch, batch_axis_name="batch",
                                                  **opts))
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
            assert np.abs(want).max() > 0
        snip = gj.snip_scores(params, named, batch, microbatch_size=4, batch_axis_name="batch")
        np.testing.assert_allclose(prunable_vector(snip),
                                   prunable_vector(gj.snip_scores(params, plain, batch,
                                                                  microbatch_size=4)), rtol=1e-10)


def test_grasp_abs_is_the_magnitude_of_theta_times_hg():
    with jax.enable_x64(True):
        params, loss, batch = convbn_setup(n=8)
        theta, _, hg = explicit_over_chunks(params, loss, cut(batch, [4, 4]))
        scores = gj.grasp_abs_scores(params, loss, batch, num_microbatches=2)
        np.testing.assert_allclose(prunable_vector(scores), np.abs(theta * hg), rtol=1e-9,
                                   atol=1e-13)
        assert float(jnp.abs(scores["BatchNorm_0"]["scale"]).max()) == 0.0
        # The same magnitudes as GraSP's, without its sign.
        grasp = prunable_vector(gj.grasp_scores(params, loss, batch, num_microbatches=2))
        assert np.any(grasp > 0) and np.any(grasp < 0)
