"""split_prunable / merge_prunable / scatter_prunable and the default prunable rule."""

import collections

import chex
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
    flags = gj.prunable.prunable_flags(params)
    theta, rest, treedef = gj.prunable.split_prunable(params, flags)
    assert [t.shape for t in theta] == [(3, 3, 2, 4), (4, 2)]
    assert sorted(r.shape for r in rest) == [(4,), (4,)]
    back = gj.prunable.merge_prunable(theta, rest, flags, treedef)
    chex.assert_trees_all_equal(back, params)
    # New θ values land at the prunable leaves only.
    moved = gj.prunable.merge_prunable([t + 1 for t in theta], rest, flags, treedef)
    np.testing.assert_array_equal(moved["head"]["kernel"], params["head"]["kernel"] + 1)
    np.testing.assert_array_equal(moved["bn"]["scale"], params["bn"]["scale"])


def test_scatter_puts_zeros_off_theta_and_split_checks_the_flag_count():
    params = tree()
    flags = gj.prunable.prunable_flags(params)
    out = scatter_prunable([jnp.full((3, 3, 2, 4), 5.0), jnp.full((4, 2), 7.0)], params, flags)
    assert float(out["conv"]["kernel"].min()) == 5.0 and float(out["head"]["kernel"].max()) == 7.0
    assert float(jnp.abs(out["bn"]["scale"]).max()) == 0.0
    with pytest.raises(ValueError, match="4 leaves but flags has 2"):
        gj.prunable.split_prunable(params, (True, False))


def test_default_rule_knows_flax_equinox_and_haiku_weight_names():
    linear = collections.namedtuple("Linear", ["weight", "bias"])  # attribute paths, as Equinox
    equinox_like = {"layers": [linear(jnp.ones((4, 3)), jnp.zeros(4)),
                               linear(jnp.ones((2, 4, 3, 3)), jnp.zeros(2))]}
    haiku_like = {"linear": {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)},
                  "conv2_d": {"w": jnp.ones((3, 3, 2, 4)), "b": jnp.zeros(4)},
                  "embed": {"embeddings": jnp.ones((10, 4))},
                  "batch_norm": {"scale": jnp.ones((1, 1, 1, 4)),
                                 "offset": jnp.zeros((1, 1, 1, 4))}}
    flax_like = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
                 "Embed_0": {"embedding": jnp.ones((10, 4))}, "w": jnp.ones(4)}

    def prunable_names(tree):
        named = jax.tree_util.tree_flatten_with_path(tree)[0]
        flags = gj.prunable.prunable_flags(tree)
        return sorted(gj.prunable.path_name(p) for (p, _), f in zip(named, flags) if f)

    assert prunable_names(equinox_like) == ["layers/0/weight", "layers/1/weight"]
    assert prunable_names(haiku_like) == ["conv2_d/w", "linear/w"]
    assert prunable_names(flax_like) == ["Dense_0/kernel"]  # embeddings and 1-D leaves stay dense
