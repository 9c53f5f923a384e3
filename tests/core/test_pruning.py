"""Iterative pruning and its schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grasp_jax as gj


def test_exponential_schedule_keeps_a_constant_fraction_per_round():
    s = gj.pruning.sparsity_schedule(0.99, 4)
    density = 1 - np.array(s)
    np.testing.assert_allclose(density[1:] / density[:-1], density[0], rtol=1e-12)
    assert s[-1] == 0.99
    assert gj.pruning.sparsity_schedule(0.9, 3, "linear") == pytest.approx([0.3, 0.6, 0.9])
    assert gj.pruning.sparsity_schedule(0.5, 1) == [0.5]
    with pytest.raises(ValueError, match="rounds"):
        gj.pruning.sparsity_schedule(0.5, 0)
    with pytest.raises(ValueError, match="schedule"):
        gj.pruning.sparsity_schedule(0.5, 2, "cosine")


def test_iterative_pruning_rescores_the_masked_network():
    params = {"a": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (30, 20))}}
    seen = []

    def score_fn(p):
        seen.append(np.asarray(p["a"]["kernel"]))
        return gj.magnitude_scores(p)

    rounds = []
    masks = gj.prune(params, score_fn, 0.9, direction="lowest", rounds=5,
                     callback=lambda r, s, m: rounds.append((r, s, gj.sparsity_report(m).sparsity)))
    assert len(seen) == 5
    # Round r sees the weights pruned so far as zeros.
    assert np.sum(seen[0] == 0) == 0 and np.sum(seen[1] == 0) == round(600 * rounds[0][1])
    for _, target, reached in rounds:
        assert reached == pytest.approx(np.floor(target * 600 + 0.5) / 600)
    assert gj.sparsity_report(masks).kept == 60
    # Iterative magnitude pruning of fixed weights equals one-shot magnitude pruning.
    one_shot = gj.masks_from_scores(gj.magnitude_scores(params), 0.9, direction="lowest")
    np.testing.assert_array_equal(masks["a"]["kernel"], one_shot["a"]["kernel"])


def test_rounds_can_change_the_outcome():
    """Scores that depend on the masked weights (SynFlow) give different iterative masks."""
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    params = {f"l{i}": {"kernel": jax.random.normal(k, (12, 12))} for i, k in enumerate(keys)}

    def net(p, x):
        for n in sorted(p):
            x = jax.nn.relu(x @ p[n]["kernel"])
        return x

    score = lambda p: gj.synflow_scores(p, net, (12,))
    one = gj.prune(params, score, 0.95, direction="lowest", rounds=1)
    many = gj.prune(params, score, 0.95, direction="lowest", rounds=20)
    assert gj.sparsity_report(one).kept == gj.sparsity_report(many).kept
    diff = sum(int(np.sum(np.asarray(one[n]["kernel"]) != np.asarray(many[n]["kernel"])))
               for n in params)
    assert diff > 0
    # SynFlow's point: iterating avoids disconnecting a whole layer.
    assert all(int(np.sum(many[n]["kernel"])) > 0 for n in params)


def test_prune_needs_a_direction_before_it_scores():
    params = {"a": {"kernel": jax.random.normal(jax.random.PRNGKey(2), (6, 5))}}
    calls = []

    def score_fn(p):
        calls.append(1)
        return gj.magnitude_scores(p)

    with pytest.raises(ValueError, match="direction='highest'.*direction='lowest'"):
        gj.prune(params, score_fn, 0.5)
    with pytest.raises(ValueError, match="contradicts"):
        gj.prune(params, score_fn, 0.5, direction="highest", criterion="magnitude")
    assert calls == []
    by_name = gj.prune(params, score_fn, 0.5, criterion="magnitude", rounds=2)
    by_direction = gj.prune(params, score_fn, 0.5, direction="lowest", rounds=2)
    np.testing.assert_array_equal(by_name["a"]["kernel"], by_direction["a"]["kernel"])


def test_prune_passes_a_seeded_tie_break_to_every_round():
    # Exact zeros everywhere but a few weights: each round's removal is mostly a tie.
    kernel = jnp.zeros((40, 10)).at[:, 0].set(jnp.arange(1.0, 41.0))
    params = {"a": {"kernel": kernel}}
    run = lambda **kw: gj.prune(params, gj.magnitude_scores, 0.5, criterion="magnitude",
                                rounds=3, **kw)["a"]["kernel"]
    with pytest.warns(gj.TieWarning):
        by_position = run()
    with pytest.warns(gj.TieWarning):
        a, again, b = (run(tie_break="random", key=jax.random.PRNGKey(s)) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a, b) and not np.array_equal(a, by_position)
    assert int(np.sum(a)) == int(np.sum(by_position)) == 200
    assert bool(np.all(a[:, 0])) and bool(np.all(b[:, 0]))  # the scores decide these
    with pytest.raises(ValueError, match="needs key="):
        gj.prune(params, gj.magnitude_scores, 0.9, criterion="magnitude", tie_break="random")


def test_directions_registry():
    assert gj.criteria.PRUNE_DIRECTION["grasp"] == "highest"
    assert all(gj.criteria.PRUNE_DIRECTION[m] == "lowest" for m in ("snip", "synflow", "magnitude"))
