"""N:M masks: exact group structure, the direction, short last groups, and current masks."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grasp_jax as gj


def reference_nm(scores, n, m, axis, highest):
    """A loop over every group: the N:M rule written out the slow way."""
    x = np.moveaxis(np.asarray(scores), axis, -1)
    keep = np.zeros(x.shape, bool)
    for row in np.ndindex(x.shape[:-1]):
        for start in range(0, x.shape[-1], m):
            vals = x[row][start:start + m]
            # Pruning order: by score from the pruned end, equal scores earlier first.
            order = np.argsort(-vals if highest else vals, kind="stable")
            kept = order[len(vals) - min(n, len(vals)):]
            keep[row + (start + kept,)] = True
    return np.moveaxis(keep, -1, axis)


def params(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {
        "conv": {"kernel": jax.random.normal(k1, (3, 3, 8, 5)), "bias": jnp.zeros(5)},
        "dense": {"kernel": jax.random.normal(k2, (12, 4)), "bias": jnp.zeros(4)},
    }


@pytest.mark.parametrize("direction", ["lowest", "highest"])
def test_two_of_four_along_the_input_axis_exactly(direction):
    scores = params()
    with warnings.catch_warnings():
        warnings.simplefilter("error", gj.TieWarning)  # distinct scores: no tie to report
        masks = gj.nm_masks(scores, 2, 4, direction=direction)
    for name in ("conv", "dense"):
        m = np.asarray(masks[name]["kernel"])
        # Groups of 4 consecutive input features, for each tap and output: 2 kept in each.
        groups = np.moveaxis(m, -2, -1).reshape(m.shape[:-2] + (m.shape[-1], -1, 4))
        assert np.all(groups.sum(-1) == 2)
        np.testing.assert_array_equal(m, reference_nm(scores[name]["kernel"], 2, 4, -2,
                                                      direction == "highest"))
        assert bool(np.all(masks[name]["bias"]))
    report = gj.sparsity_report(masks)
    assert report.kept * 2 == report.total


def test_a_short_last_group_keeps_min_n_r():
    # 7 input channels under 2:4: groups [0:4] keep 2, [4:7] keep 2 of 3; 3 channels keep 2 of 3;
    # 1:4 on 6 inputs keeps 1 of [0:4] and 1 of [4:6].
    cases = [((3, 3, 7, 2), 2, 4, 4), ((3, 3, 3, 2), 2, 4, 2), ((6, 3), 1, 4, 2)]
    for shape, n, m, kept_per_column in cases:
        s = {"w": {"kernel": jax.random.normal(jax.random.PRNGKey(1), shape)}}
        mask = np.asarray(gj.nm_masks(s, n, m, criterion="snip")["w"]["kernel"])
        assert np.all(mask.sum(axis=-2) == kept_per_column), shape
        np.testing.assert_array_equal(mask, reference_nm(s["w"]["kernel"], n, m, -2, False))


def test_another_axis_and_ties_by_position():
    # PyTorch-style (out, in) weights group along the last axis.
    s = {"w": {"kernel": jax.random.normal(jax.random.PRNGKey(2), (5, 8))}}
    mask = np.asarray(gj.nm_masks(s, 1, 2, direction="lowest", axis=-1)["w"]["kernel"])
    assert np.all(mask.reshape(5, 4, 2).sum(-1) == 1)
    np.testing.assert_array_equal(mask, reference_nm(s["w"]["kernel"], 1, 2, -1, False))
    # Equal scores: the earlier weights of each group are pruned first.
    zeros = {"w": {"kernel": jnp.zeros((8, 2)).at[0, 1].set(1.0)}}
    # 4 groups, 2 removed from each, all 8 chosen by position (the group holding the 1.0
    # still ties among its three zeros).
    with pytest.warns(gj.TieWarning, match=r"2:4 groups, position .* chose 8 of the 8 .*w/kernel"):
        tied = np.asarray(gj.nm_masks(zeros, 2, 4, direction="lowest")["w"]["kernel"])
    np.testing.assert_array_equal(tied[:, 0], [False, False, True, True] * 2)


def test_current_masks_stay_pruned_and_count_towards_the_group():
    s = {"w": {"kernel": jax.random.normal(jax.random.PRNGKey(3), (8, 3))}}
    current = {"w": {"kernel": jnp.ones((8, 3), bool).at[0, 0].set(False).at[1, 0].set(False)
                     .at[2, 0].set(False)}}
    mask = np.asarray(gj.nm_masks(s, 2, 4, direction="lowest", masks=current)["w"]["kernel"])
    assert not mask[:3, 0].any() and mask[:4, 0].sum() == 1  # 3 already pruned: one left
    assert np.all(mask[4:, 0].sum() == 2) and np.all(mask[:, 1:].reshape(2, 4, 2).sum(1) == 2)


def test_bad_arguments_are_refused():
    s = params()
    with pytest.raises(ValueError, match="0 < n < m"):
        gj.nm_masks(s, 4, 4, direction="lowest")
    with pytest.raises(ValueError, match="n must be an integer"):
        gj.nm_masks(s, 2.0, 4, direction="lowest")
    with pytest.raises(ValueError, match="direction='highest'"):
        gj.nm_masks(s, 2, 4)
    with pytest.raises(ValueError, match="axis 4 is out of range for conv/kernel"):
        gj.nm_masks(s, 2, 4, direction="lowest", axis=4)
