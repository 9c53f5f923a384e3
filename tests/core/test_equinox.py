"""An Equinox model prunes with the default rule: its Linear/Conv weights are named ``weight``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grasp_jax as gj

eqx = pytest.importorskip("equinox")


def test_equinox_mlp_scores_and_prunes_with_the_default_rule():
    key = jax.random.PRNGKey(0)
    model = eqx.nn.MLP(in_size=8, out_size=3, width_size=16, depth=2, key=key)
    params, static = eqx.partition(model, eqx.is_array)
    x = jax.random.normal(jax.random.PRNGKey(1), (12, 8))
    y = jnp.arange(12) % 3

    def loss_fn(p, batch):
        net = eqx.combine(p, static)
        logits = jax.vmap(net)(batch["x"])
        return gj.cross_entropy_with_temperature(logits, batch["y"])

    flags = gj.prunable.prunable_flags(params)
    names = [gj.prunable.path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    # Weights are θ, biases are not.
    assert [n for n, f in zip(names, flags) if f] == [n for n in names if n.endswith("weight")]
    assert len([f for f in flags if f]) == 3
    scores = gj.grasp_scores(params, loss_fn, {"x": x, "y": y}, num_microbatches=2)
    masks = gj.masks_from_scores(scores, 0.5, criterion="grasp")
    report = gj.sparsity_report(masks)
    assert report.total - report.kept == int(np.floor(0.5 * report.total + 0.5))
    pruned = eqx.combine(gj.apply_masks(params, masks), static)
    assert np.isfinite(np.asarray(jax.vmap(pruned)(x))).all()
