"""split_prunable / merge_prunable / scatter_prunable and the default prunable rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grasp_jax as gj
from grasp_jax.prunable import scatter_prunable


def tree():
    return {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)},
            "bn": {"scale": jnp.full(4, 2.0)}, "head": {"kernel": jnp.arange(8.0).reshape(4, 2)}}


def test_split_then_merge_is_the_identity_and_theta_is_the_prunable_leaves():
    params = tree()
    flags = gj.prunable_flags(params)
    theta, rest, treedef = gj.split_prunable(params, flags)
    assert [t.shape for t in theta] == [(3, 3, 2, 4), (4, 2)]
    assert sorted(r.shape for r in rest) == [(4,), (4,)]
    back = gj.merge_prunable(theta, rest, flags, treedef)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    # New θ values land at the prunable leaves only.
    moved = gj.merge_prunable([t + 1 for t in theta], rest, flags, treedef)
    np.testing.assert_array_equal(moved["head"]["kernel"], params["head"]["kernel"] + 1)
    np.testing.assert_array_equal(moved["bn"]["scale"], params["bn"]["scale"])


def test_scatter_puts_zeros_off_theta_and_split_checks_the_flag_count():
    params = tree()
    flags = gj.prunable_flags(params)
    out = scatter_prunable([jnp.full((3, 3, 2, 4), 5.0), jnp.full((4, 2), 7.0)], params, flags)
    assert float(out["conv"]["kernel"].min()) == 5.0 and float(out["head"]["kernel"].max()) == 7.0
    assert float(jnp.abs(out["bn"]["scale"]).max()) == 0.0
    with pytest.raises(ValueError, match="4 leaves but flags has 2"):
        gj.split_prunable(params, (True, False))
