"""masked_updates keeps pruned weights at exactly zero under real optimizers."""

import chex
import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import grasp_jax as gj


def problem(seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = {
        "dense0": {"kernel": jax.random.normal(k1, (8, 16)) * 0.3, "bias": jnp.zeros(16)},
        "dense1": {"kernel": jax.random.normal(k2, (16, 3)) * 0.3, "bias": jnp.zeros(3)},
    }
    x = jax.random.normal(k3, (64, 8))
    y = jax.random.randint(k4, (64,), 0, 3)

    def loss(p):
        h = jax.nn.relu(x @ p["dense0"]["kernel"] + p["dense0"]["bias"])
        return gj.cross_entropy_with_temperature(h @ p["dense1"]["kernel"] + p["dense1"]["bias"], y)

    return params, loss


@pytest.mark.parametrize(
    "optimizer",
    [
        optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)),
        optax.adamw(1e-2, weight_decay=0.1),
    ],
    ids=["sgd-momentum-wd", "adamw"],
)
def test_pruned_weights_stay_exactly_zero_and_others_move(optimizer):
    params, loss = problem()
    masks = gj.masks_from_scores(gj.random_scores(params, jax.random.PRNGKey(1)), 0.8,
                                 criterion="random")
    params = gj.apply_masks(params, masks)
    start = params
    tx = optax.chain(optimizer, gj.masked_updates(masks))
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(100):
        params, state = step(params, state)
    for name in ("dense0", "dense1"):
        p = np.asarray(params[name]["kernel"])
        m = np.asarray(masks[name]["kernel"])
        assert np.all(p[~m] == 0.0), f"{name}: a pruned weight moved"
        moved = p[m] != np.asarray(start[name]["kernel"])[m]
        assert moved.mean() > 0.95, f"{name}: kept weights did not train"
        assert np.any(np.asarray(params[name]["bias"]) != 0.0)  # dense leaves train freely
    assert float(loss(params)) < float(loss(start))


def test_without_the_transform_pruned_weights_do_move():
    """The control for the test above: plain SGD-momentum revives pruned weights."""
    params, loss = problem()
    masks = gj.masks_from_scores(gj.random_scores(params, jax.random.PRNGKey(1)), 0.8,
                                 criterion="random")
    params = gj.apply_masks(params, masks)
    tx = optax.sgd(0.1, momentum=0.9)
    state = tx.init(params)
    updates, _ = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
    m = np.asarray(masks["dense0"]["kernel"])
    assert np.any(np.asarray(params["dense0"]["kernel"])[~m] != 0.0)


def test_nonfinite_update_of_a_pruned_weight_stays_zero():
    masks = {"w": {"kernel": jnp.array([[True, False]])}}
    tx = gj.masked_updates(masks)
    params = {"w": {"kernel": jnp.zeros((1, 2))}}
    updates, _ = tx.update({"w": {"kernel": jnp.array([[1.0, jnp.nan]])}}, tx.init(params))
    np.testing.assert_array_equal(updates["w"]["kernel"], [[1.0, 0.0]])


def test_init_rejects_masks_of_another_structure():
    params, _ = problem()
    with pytest.raises(ValueError, match="structure"):
        gj.masked_updates({"dense0": {"kernel": jnp.ones((8, 16), bool)}}).init(params)


def test_update_rejects_updates_of_another_shape_or_structure_at_trace_time():
    masks = {"w": {"kernel": jnp.ones((4, 3), bool)}, "b": {"kernel": jnp.ones((3, 2), bool)}}
    tx = gj.masked_updates(masks)
    state = tx.init(jax.tree_util.tree_map(jnp.zeros_like, masks))
    wrong = {"w": {"kernel": jnp.ones((1, 3))}, "b": {"kernel": jnp.ones((3, 2))}}
    with pytest.raises(ValueError, match=r"w/kernel: \(4, 3\) vs \(1, 3\)"):
        tx.update(wrong, state)
    with pytest.raises(ValueError, match=r"w/kernel: \(4, 3\) vs \(1, 3\)"):
        jax.jit(tx.update)(wrong, state)
    with pytest.raises(ValueError, match="structure"):
        tx.update({"w": {"kernel": jnp.ones((4, 3))}}, state)
    right = jax.tree_util.tree_map(lambda m: jnp.ones(m.shape), masks)
    chex.assert_trees_all_equal(jax.jit(tx.update)(right, state)[0], right)


def test_state_round_trips_through_orbax(tmp_path):
    params, _ = problem()
    masks = gj.masks_from_scores(gj.magnitude_scores(params), 0.5, direction="lowest")
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), gj.masked_updates(masks))
    state = tx.init(params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "state", state)
        ckptr.wait_until_finished()
        restored = ckptr.restore(tmp_path / "state", state)
    masked_state = restored[1]
    assert isinstance(masked_state, gj.optim.MaskedUpdatesState)
    chex.assert_trees_all_equal(masked_state.masks, masks, strict=True)  # dtype bool too


def test_works_under_pmap():
    params, loss = problem()
    masks = gj.masks_from_scores(gj.magnitude_scores(params), 0.7, direction="lowest")
    params = gj.apply_masks(params, masks)
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), gj.masked_updates(masks))
    n = jax.local_device_count()
    rep_params = flax.jax_utils.replicate(params)
    rep_state = flax.jax_utils.replicate(tx.init(params))

    def step(p, s):
        g = jax.lax.pmean(jax.grad(loss)(p), "d")
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p, _ = jax.pmap(step, axis_name="d")(rep_params, rep_state)
    assert jax.tree_util.tree_leaves(p)[0].shape[0] == n
    p0 = flax.jax_utils.unreplicate(p)
    m = np.asarray(masks["dense1"]["kernel"])
    assert np.all(np.asarray(p0["dense1"]["kernel"])[~m] == 0.0)
