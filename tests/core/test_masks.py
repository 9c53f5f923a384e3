"""masks_from_scores, apply_masks and the sparsity report."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grasp_jax as gj


def tree(seed=0, shapes=((20, 10), (10, 5))):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    out = {}
    for i, (k, s) in enumerate(zip(keys, shapes)):
        out[f"layer{i}"] = {"kernel": jax.random.normal(k, s), "bias": jnp.ones(s[-1])}
    return out


def kept(masks, name):
    return int(np.sum(masks[name]["kernel"]))


# 0.996 leaves one of 250 weights; 0.999 (all 250) is refused, see the collapse tests below.
@pytest.mark.filterwarnings("ignore::grasp_jax.LayerCollapseWarning")
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.98, 0.996])
def test_global_removes_exact_count(sparsity):
    scores = tree()
    masks = gj.masks_from_scores(scores, sparsity, direction="lowest")
    total = 200 + 50
    removed = total - kept(masks, "layer0") - kept(masks, "layer1")
    assert removed == int(np.floor(sparsity * total + 0.5))
    # Non-prunable leaves are kept whole.
    assert masks["layer0"]["bias"].dtype == jnp.bool_ and bool(masks["layer0"]["bias"].all())


@pytest.mark.parametrize("direction", ["lowest", "highest"])
def test_global_direction_matches_a_sort(direction):
    scores = tree(1)
    masks = gj.masks_from_scores(scores, 0.7, direction=direction)
    flat = np.concatenate([np.ravel(scores[n]["kernel"]) for n in ("layer0", "layer1")])
    keep = np.concatenate([np.ravel(masks[n]["kernel"]) for n in ("layer0", "layer1")])
    n_remove = int(np.floor(0.7 * flat.size + 0.5))
    order = np.argsort(-flat if direction == "highest" else flat, kind="stable")
    expected = np.ones(flat.size, bool)
    expected[order[:n_remove]] = False
    np.testing.assert_array_equal(keep, expected)
    if direction == "highest":
        assert flat[~keep].min() >= flat[keep].max()
    else:
        assert flat[~keep].max() <= flat[keep].min()


def test_layerwise_removes_the_fraction_from_every_layer():
    scores = tree(2)
    # Make layer1 far more prunable than layer0 so that global and layerwise differ.
    scores["layer1"]["kernel"] = scores["layer1"]["kernel"] - 100.0
    with pytest.warns(gj.LayerCollapseWarning, match="layer1/kernel"):
        glob = gj.masks_from_scores(scores, 0.2, scope="global", direction="lowest")
    assert kept(glob, "layer1") == 0  # 50 lowest are all of layer1
    lw = gj.masks_from_scores(scores, 0.2, scope="layerwise", direction="lowest")
    assert kept(lw, "layer0") == 200 - 40 and kept(lw, "layer1") == 50 - 10


def test_ties_are_broken_deterministically_by_position():
    scores = {"a": {"kernel": jnp.zeros((4, 5))}, "b": {"kernel": jnp.zeros((5, 2))}}
    with pytest.warns(gj.TieWarning, match="chose 15 of the 15"):
        masks = gj.masks_from_scores(scores, 0.5, direction="lowest")
    keep = np.concatenate([np.ravel(masks["a"]["kernel"]), np.ravel(masks["b"]["kernel"])])
    # 15 of 30 removed: the first 15 positions in flattening order.
    np.testing.assert_array_equal(keep, np.arange(30) >= 15)
    with pytest.warns(gj.TieWarning):
        again = gj.masks_from_scores(scores, 0.5, direction="lowest")
    np.testing.assert_array_equal(again["a"]["kernel"], masks["a"]["kernel"])
    # Partial ties at the threshold: values 0,1,1,1,2 remove 2 -> the 0 and the first 1.
    s = {"w": {"kernel": jnp.array([[1.0, 0.0, 1.0, 2.0, 1.0]])}}
    with pytest.warns(gj.TieWarning, match="chose 1 of the 2"):
        partial = gj.masks_from_scores(s, 0.4, direction="lowest")
    np.testing.assert_array_equal(partial["w"]["kernel"][0], [False, False, True, True, True])


def test_negative_zero_and_extreme_values_order_correctly():
    # (inf is rejected as a score; the largest finite floats are not.)
    vals = jnp.array([[-3e38, -3.0, -0.0, 0.0, 1e-30, 5.0, 3e38, 3.4e38]])
    s = {"w": {"kernel": vals}}
    for n in range(1, 8):
        sp = n / 8
        low = gj.masks_from_scores(s, sp, direction="lowest")["w"]["kernel"][0]
        np.testing.assert_array_equal(low, np.arange(8) >= n)
        high = gj.masks_from_scores(s, sp, direction="highest")["w"]["kernel"][0]
        np.testing.assert_array_equal(high, np.arange(8) < 8 - n)


def test_float64_scores_keep_their_resolution():
    with jax.enable_x64(True):
        base = 1.0
        vals = jnp.array([[base + 3e-16 * i for i in range(6)]], jnp.float64)
        assert len(set(np.asarray(vals[0]).tolist())) == 6  # distinct in float64, not in float32
        masks = gj.masks_from_scores({"w": {"kernel": vals[:, ::-1]}}, 0.5, direction="lowest")
        np.testing.assert_array_equal(masks["w"]["kernel"][0], [True] * 3 + [False] * 3)


def test_existing_masks_stay_pruned_and_count():
    scores = tree(3)
    first = gj.masks_from_scores(scores, 0.5, direction="lowest")
    # Rescore with the opposite ranking: previously pruned weights would be kept now.
    flipped = jax.tree_util.tree_map(lambda x: -x, scores)
    second = gj.masks_from_scores(flipped, 0.6, masks=first, direction="lowest")
    for n in ("layer0", "layer1"):
        assert not np.any(np.asarray(second[n]["kernel"]) & ~np.asarray(first[n]["kernel"]))
    assert gj.sparsity_report(second).kept == 250 - 150
    with pytest.raises(ValueError, match="sparsity can only grow"):
        gj.masks_from_scores(scores, 0.3, masks=first, direction="lowest")


def test_bad_inputs_are_rejected_and_name_the_problem():
    scores = tree()
    for bad in (1.0, -0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ValueError, match="sparsity"):
            gj.masks_from_scores(scores, bad, direction="lowest")
    broken = jax.tree_util.tree_map(lambda x: x, scores)
    broken["layer1"]["kernel"] = broken["layer1"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="layer1/kernel"):
        gj.masks_from_scores(broken, 0.5, direction="lowest")
    broken["layer1"]["kernel"] = broken["layer1"]["kernel"].at[0, 0].set(jnp.inf)
    with pytest.raises(ValueError, match="layer1/kernel"):
        gj.masks_from_scores(broken, 0.5, direction="lowest")
    with pytest.raises(ValueError, match="no prunable leaf"):
        gj.masks_from_scores({"b": jnp.ones(3)}, 0.5, direction="lowest")
    with pytest.raises(ValueError, match="scope"):
        gj.masks_from_scores(scores, 0.5, scope="per-layer", direction="lowest")
    with pytest.raises(ValueError, match="direction must be 'highest' or 'lowest'"):
        gj.masks_from_scores(scores, 0.5, direction="largest")


def test_the_direction_is_explicit_or_implied_by_the_criterion():
    scores = tree(8)
    with pytest.raises(ValueError, match="direction='highest'.*direction='lowest'.*criterion="):
        gj.masks_from_scores(scores, 0.5)
    with pytest.raises(ValueError, match="direction='lowest' contradicts criterion='grasp'"):
        gj.masks_from_scores(scores, 0.5, direction="lowest", criterion="grasp")
    with pytest.raises(ValueError, match="unknown criterion 'grasp2'"):
        gj.masks_from_scores(scores, 0.5, criterion="grasp2")
    for criterion, direction in gj.criteria.PRUNE_DIRECTION.items():
        chex.assert_trees_all_equal(
            gj.masks_from_scores(scores, 0.5, criterion=criterion),
            gj.masks_from_scores(scores, 0.5, direction=direction),
            gj.masks_from_scores(scores, 0.5, direction=direction, criterion=criterion),
        )
    high = gj.masks_from_scores(scores, 0.5, criterion="grasp")
    low = gj.masks_from_scores(scores, 0.5, criterion="snip")
    assert not np.array_equal(high["layer0"]["kernel"], low["layer0"]["kernel"])


def test_apply_masks_zeroes_exactly_and_checks_structure():
    params = tree(4)
    masks = gj.masks_from_scores(gj.magnitude_scores(params), 0.8, direction="lowest")
    pruned = gj.apply_masks(params, masks)
    for n in ("layer0", "layer1"):
        p, m = np.asarray(pruned[n]["kernel"]), np.asarray(masks[n]["kernel"])
        assert np.all(p[~m] == 0.0) and np.all(p[m] == np.asarray(params[n]["kernel"])[m])
    np.testing.assert_array_equal(pruned["layer0"]["bias"], params["layer0"]["bias"])
    with pytest.raises(ValueError, match="structure"):
        gj.apply_masks(params, {"layer0": masks["layer0"]})
    wrong_shape = jax.tree_util.tree_map(lambda m: m, masks)
    wrong_shape["layer1"]["kernel"] = jnp.ones((5, 10), bool)
    with pytest.raises(ValueError, match="layer1/kernel"):
        gj.apply_masks(params, wrong_shape)


def test_sparsity_report_counts_and_formats():
    params = tree(5)
    masks = gj.masks_from_scores(gj.magnitude_scores(params), 0.6, scope="layerwise",
                                 direction="lowest")
    report = gj.sparsity_report(masks)
    assert [l.name for l in report.layers] == ["layer0/kernel", "layer1/kernel"]
    assert [(l.kept, l.total) for l in report.layers] == [(80, 200), (20, 50)]
    assert report.total == 250 and report.kept == 100 and report.dense_params == 15
    assert abs(report.sparsity - 0.6) < 1e-12
    md = report.to_markdown()
    assert "| layer0/kernel | 20×10 | 80 | 200 | 40.00% |" in md
    assert "layer1/kernel" in str(report)
    d = report.as_dict()
    assert d["layers"][1]["density"] == 0.4 and d["kept"] == 100


def test_large_global_selection_is_exact():
    # A quarter of ResNet-50's prunable size keeps the test quick; the code path is the same.
    n = 6_000_000
    scores = {"a": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (n // 4, 4))}}
    masks = gj.masks_from_scores(scores, 0.9, direction="highest")
    assert int(np.sum(masks["a"]["kernel"])) == n - int(np.floor(0.9 * n + 0.5))


@pytest.mark.filterwarnings("ignore::grasp_jax.LayerCollapseWarning")
def test_a_sparsity_that_rounds_to_every_weight_is_refused():
    small = {"w": {"kernel": jnp.arange(18.0).reshape(6, 3)}}
    with pytest.raises(ValueError, match="all of the prunable weights"):
        gj.masks_from_scores(small, 0.99, direction="lowest")  # round(17.82) = 18
    # round(0.97 × 18) = round(17.46) = 17
    assert gj.sparsity_report(gj.masks_from_scores(small, 0.97, direction="lowest")).kept == 1
    # Layerwise: a leaf of 4 weights cannot lose round(0.9 × 4) = 4 ...
    scores = tree(6, shapes=((20, 10), (2, 2)))
    with pytest.raises(ValueError, match="layer layer1/kernel"):
        gj.masks_from_scores(scores, 0.9, scope="layerwise", direction="lowest")
    # ... while the global count, 184 of 204, is fine.
    assert gj.sparsity_report(gj.masks_from_scores(scores, 0.9, direction="lowest")).kept == 20


def test_emptied_layers_are_warned_and_reported():
    scores = tree(7)
    scores["layer1"]["kernel"] = scores["layer1"]["kernel"] - 100.0
    with pytest.warns(gj.LayerCollapseWarning, match="1 prunable layer.*layer1/kernel"):
        masks = gj.masks_from_scores(scores, 0.5, direction="lowest")
    report = gj.sparsity_report(masks)
    assert report.collapsed == ("layer1/kernel",)
    assert report.as_dict()["collapsed"] == ["layer1/kernel"]
    assert "Collapsed (no weight kept): layer1/kernel" in str(report)
    assert "Collapsed (no weight kept): layer1/kernel" in report.to_markdown()
    # No collapse: no warning, nothing listed.
    with warnings.catch_warnings():
        warnings.simplefilter("error", gj.LayerCollapseWarning)
        fine = gj.sparsity_report(gj.masks_from_scores(scores, 0.1, direction="lowest"))
    assert fine.collapsed == () and "Collapsed" not in str(fine) + fine.to_markdown()


def mostly_zero_scores(seed=9, zero_fraction=0.97):
    """Scores like those of a ResNet whose last BatchNorm scale starts at 0: mostly exact zeros."""
    scores = tree(seed, shapes=((40, 25), (20, 10)))
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), 2)
    for k, name in zip(keys, ("layer0", "layer1")):
        kernel = scores[name]["kernel"]
        zero = jax.random.uniform(k, kernel.shape) < zero_fraction
        scores[name]["kernel"] = jnp.where(zero, 0.0, kernel)
    return scores


def flat_kernels(tree_):
    return np.concatenate([np.ravel(tree_[n]["kernel"]) for n in ("layer0", "layer1")])


def test_a_tie_that_decides_the_mask_warns_with_its_count_and_layers():
    scores = mostly_zero_scores()
    flat = flat_kernels(scores)
    n_zero, n_positive = int(np.sum(flat == 0)), int(np.sum(flat > 0))
    n_remove = int(np.floor(0.9 * flat.size + 0.5))
    zeros_in = [int(np.sum(np.asarray(scores[n]["kernel"]) == 0)) for n in ("layer0", "layer1")]
    # GraSP removes the highest: every positive score, then zeros chosen by position.
    expected = (f"chose {n_remove - n_positive:,} of the {n_remove:,} .* among {n_zero:,} weights "
                f"whose score equals the threshold 0; layers with tied weights: "
                f"layer0/kernel \\({zeros_in[0]:,}\\), layer1/kernel \\({zeros_in[1]:,}\\)")
    with pytest.warns(gj.TieWarning, match=expected):
        gj.masks_from_scores(scores, 0.9, criterion="grasp")
    with pytest.warns(gj.TieWarning, match="layers with tied weights: layer1/kernel"):
        gj.masks_from_scores(scores, 0.9, criterion="grasp", scope="layerwise")


def test_ties_that_decide_little_or_nothing_do_not_warn():
    def lowest(vals, sparsity):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gj.masks_from_scores({"w": {"kernel": jnp.reshape(vals, (50, 20))}}, sparsity,
                                 direction="lowest")
        return [w for w in caught if issubclass(w.category, gj.TieWarning)]

    vals = jnp.arange(1000.0)
    assert lowest(vals.at[498:502].set(498.0), 0.5) == []  # 2 of 500 removed by the tie-break
    assert len(lowest(vals.at[490:510].set(490.0), 0.5)) == 1  # 10 of 500: 2%
    assert lowest(vals.at[:600].set(0.0), 0.6) == []  # the whole tie is removed: no choice made


@pytest.mark.filterwarnings("ignore::grasp_jax.TieWarning")
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_random_tie_break_is_seeded_exact_and_only_moves_tied_weights(scope):
    scores = mostly_zero_scores(11)
    flat = flat_kernels(scores)

    def mask(**kw):
        return flat_kernels(gj.masks_from_scores(scores, 0.9, criterion="grasp", scope=scope, **kw))

    by_position = mask()
    a, again, b = (mask(tie_break="random", key=jax.random.PRNGKey(k)) for k in (0, 0, 1))
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a, b) and not np.array_equal(a, by_position)
    for m in (a, b):
        assert m.sum() == by_position.sum()
        np.testing.assert_array_equal(m[flat != 0], by_position[flat != 0])
    if scope == "global":
        # Position empties layer0's zeros first; a random draw spreads the removal over both.
        kept0 = lambda m: int(m[:1000][flat[:1000] == 0].sum())
        assert kept0(by_position) == 0 < kept0(a)


def test_tie_break_arguments_are_checked():
    scores = tree()
    with pytest.raises(ValueError, match="needs key="):
        gj.masks_from_scores(scores, 0.5, direction="lowest", tie_break="random")
    with pytest.raises(ValueError, match="key= is used only"):
        gj.masks_from_scores(scores, 0.5, direction="lowest", key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="tie_break must be one of"):
        gj.masks_from_scores(scores, 0.5, direction="lowest", tie_break="first")
