"""Each ablation does what it says."""

import jax
import jax.numpy as jnp
import numpy as np

import grasp_jax as gj
from grasp_jax.ablations import inverted_masks, reinitialized, shuffle_masks


def params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    return {"a": {"kernel": jax.random.normal(k[0], (30, 20)), "bias": jnp.ones(20)},
            "b": {"kernel": jax.random.normal(k[1], (20, 10)), "bias": jnp.ones(10)}}


def test_shuffle_keeps_every_layers_count_and_moves_weights():
    p = params()
    masks = gj.masks_from_scores(gj.magnitude_scores(p), 0.8, direction="lowest")
    shuffled = shuffle_masks(masks, jax.random.PRNGKey(1))
    for n in ("a", "b"):
        assert int(shuffled[n]["kernel"].sum()) == int(masks[n]["kernel"].sum())
        assert np.any(np.asarray(shuffled[n]["kernel"]) != np.asarray(masks[n]["kernel"]))
        assert bool(shuffled[n]["bias"].all())


def test_invert_keeps_the_same_count_from_the_other_end():
    p = params(1)
    scores = gj.magnitude_scores(p)
    masks = gj.masks_from_scores(scores, 0.9, direction="lowest")
    inv = inverted_masks(scores, 0.9, direction="lowest")
    assert gj.sparsity_report(inv).kept == gj.sparsity_report(masks).kept == 80
    flat_s = np.concatenate([np.ravel(scores[n]["kernel"]) for n in ("a", "b")])
    flat_i = np.concatenate([np.ravel(inv[n]["kernel"]) for n in ("a", "b")])
    assert flat_s[flat_i].max() <= flat_s[~flat_i].min()  # kept the smallest magnitudes
    flat_m = np.concatenate([np.ravel(masks[n]["kernel"]) for n in ("a", "b")])
    assert not np.any(flat_m & flat_i)  # at 90% the kept sets are disjoint


def test_reinit_changes_values_only_where_kept():
    p = params(2)
    masks = gj.masks_from_scores(gj.magnitude_scores(p), 0.7, direction="lowest")
    fresh = params(3)
    out = reinitialized(fresh, masks)
    for n in ("a", "b"):
        m = np.asarray(masks[n]["kernel"])
        k = np.asarray(out[n]["kernel"])
        assert np.all(k[~m] == 0.0)
        np.testing.assert_array_equal(k[m], np.asarray(fresh[n]["kernel"])[m])
        assert not np.allclose(k[m], np.asarray(p[n]["kernel"])[m])
