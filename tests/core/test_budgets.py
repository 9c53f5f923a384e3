"""Per-layer budgets: uniform and ERK counts, and masks_from_scores(scope=...) that uses them."""

import math

import chex
import jax
import numpy as np
import pytest

import grasp_jax as gj
from grasp_jax.budgets import apportion, erk_densities, layer_removal_counts

SHAPES = [(3, 3, 3, 16), (3, 3, 16, 32), (3, 3, 32, 32), (512, 10)]


def scores_for(shapes, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return {f"l{i}": {"kernel": jax.random.normal(k, s)}
            for i, (k, s) in enumerate(zip(keys, shapes))}


def test_erk_on_a_hand_worked_example():
    # raw (sum/prod): (2,2) -> 4/4 = 1, (10,10) -> 20/100 = 0.2; keep 52 of 104.
    # eps = 52 / (1·4 + 0.2·100) = 2.17 makes the first layer's density exceed 1: dense;
    # then eps = (52 - 4) / 20 = 2.4 and the second keeps 0.48.
    np.testing.assert_allclose(erk_densities([(2, 2), (10, 10)], 0.5), [1.0, 0.48], rtol=1e-12)


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_erk_densities_follow_the_definition(sparsity):
    d = np.array(erk_densities(SHAPES, sparsity))
    sizes = np.array([math.prod(s) for s in SHAPES])
    raw = np.array([sum(s) for s in SHAPES]) / sizes
    np.testing.assert_allclose(np.sum(d * sizes), (1 - sparsity) * sizes.sum(), rtol=1e-12)
    assert np.all(d <= 1.0) and np.all(d > 0)
    free = d < 1.0
    ratio = d[free] / raw[free]  # one ε for all layers not kept dense
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)
    # A dense layer is one whose density at that ε would exceed 1.
    assert np.all(ratio[0] * raw[~free] >= 1.0)
    if sparsity == 0.5:
        assert not free[0]  # the 3-channel stem is kept dense at 50%


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.98, 0.995])
def test_erk_counts_sum_exactly_and_round_the_densities(sparsity):
    counts = layer_removal_counts(SHAPES, sparsity, "erk")
    sizes = [math.prod(s) for s in SHAPES]
    assert sum(counts) == math.floor(sparsity * sum(sizes) + 0.5)
    real = [(1 - d) * n for d, n in zip(erk_densities(SHAPES, sparsity), sizes)]
    assert all(abs(c - r) < 1 for c, r in zip(counts, real))
    assert layer_removal_counts(SHAPES, sparsity, "uniform") == [
        math.floor(sparsity * n + 0.5) for n in sizes
    ]


def test_apportion_respects_lower_and_upper_bounds():
    assert apportion([1.5, 1.5, 1.0], 4, [0, 0, 0], [9, 9, 9]) == [2, 1, 1]
    assert apportion([1.5, 1.5, 1.0], 4, [0, 2, 0], [9, 9, 9]) == [1, 2, 1]
    assert apportion([2.9, 1.1], 4, [0, 0], [2, 9]) == [2, 2]
    with pytest.raises(ValueError, match="sparsity can only grow"):
        apportion([1.0, 1.0], 2, [2, 1], [9, 9])


@pytest.mark.slow
def test_masks_from_scores_with_erk_scope_removes_the_budget_from_each_layer():
    scores = scores_for(SHAPES)
    masks = gj.masks_from_scores(scores, 0.9, scope="erk", direction="lowest")
    counts = layer_removal_counts(SHAPES, 0.9, "erk")
    report = gj.sparsity_report(masks)
    assert [l.total - l.kept for l in report.layers] == counts
    for i in range(len(SHAPES)):  # within a layer: the lowest scores go
        s, m = np.asarray(scores[f"l{i}"]["kernel"]), np.asarray(masks[f"l{i}"]["kernel"])
        assert s[~m].max() <= s[m].min()
    uniform = gj.masks_from_scores(scores, 0.9, scope="uniform", direction="lowest")
    layerwise = gj.masks_from_scores(scores, 0.9, scope="layerwise", direction="lowest")
    chex.assert_trees_all_equal(uniform, layerwise)


def test_iterative_erk_pruning_only_adds_to_the_masks():
    params = scores_for(SHAPES, seed=1)
    seen = []
    masks = gj.prune(params, gj.magnitude_scores, 0.95, criterion="magnitude", rounds=6,
                     scope="erk", callback=lambda r, s, m: seen.append(m))
    for before, after in zip(seen, seen[1:]):
        added = jax.tree_util.tree_map(lambda a, b: np.asarray(b) & ~np.asarray(a), before, after)
        chex.assert_trees_all_equal(added, jax.tree_util.tree_map(np.zeros_like, added))
    report = gj.sparsity_report(masks)
    assert [l.total - l.kept for l in report.layers] == layer_removal_counts(SHAPES, 0.95, "erk")


def test_bad_scopes_and_shapes_are_refused():
    with pytest.raises(ValueError, match="scope must be one of"):
        gj.masks_from_scores(scores_for(SHAPES), 0.5, scope="ER", direction="lowest")
    with pytest.raises(ValueError, match="non-empty"):
        erk_densities([(0, 3)], 0.5)
