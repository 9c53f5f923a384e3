"""grasp_jax.nnx: NNX modules scored, masked and trained in a few lines.

The helpers are checked against the functional API called by hand the way the
README used to ask (split, a fresh copy of the non-param state merged inside
the loss, the modes set on it) and against an explicit float64 Hessian.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import grasp_jax as gj
import grasp_jax.nnx as gnnx

from tests.helpers.tiny_models import explicit_g_hg, prunable_vector

# nnx.BatchNorm keeps float32 running averages whatever the param dtype; the
# float64 tests' (thrown-away) updates of them make jax warn about the cast.
pytestmark = pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")


class Net(nnx.Module):
    """As the NNX guides write one: Conv, BatchNorm, Dropout, Linear."""

    def __init__(self, rngs, dtype=jnp.float32, dropout_rngs=True):
        self.conv = nnx.Conv(2, 3, (3, 3), param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.bn = nnx.BatchNorm(3, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs if dropout_rngs else None)
        self.head = nnx.Linear(3, 4, param_dtype=dtype, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = self.drop(nnx.relu(self.bn(self.conv(x))))
        return self.head(h.mean(axis=(1, 2)))


def loss_fn(model, batch):
    return gj.cross_entropy_with_temperature(model(batch["x"]), batch["y"], 2.0)


def make_batch(dtype=jnp.float32, n=8):
    x = jax.random.normal(jax.random.PRNGKey(0), (n, 5, 5, 2), dtype)
    return {"x": x, "y": jnp.arange(n) % 4}


def host_state(model):
    """Every Variable of ``model`` as numpy (rng keys as their key data)."""
    def host(a):
        is_key = jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
        return np.asarray(jax.random.key_data(a) if is_key else a)

    return jax.tree_util.tree_map(host, nnx.state(model))


def by_hand(model, *, train=True):
    """The functional API on the Param state, with the recipe a user had to write."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, batch):
        m = nnx.merge(graphdef, p, jax.tree_util.tree_map(jnp.array, rest))
        m.set_attributes(use_running_average=not train, deterministic=True,
                         raise_if_not_found=False)
        return loss_fn(m, batch)

    def apply_eval(p, x):
        m = nnx.merge(graphdef, p, jax.tree_util.tree_map(jnp.array, rest))
        m.eval()
        return m(x)

    return params, loss, apply_eval


# --------------------------------------------------------------------------
# Agreement with the functional API and with explicit math (float64).


@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_grasp_scores_agree_with_functional_api_and_explicit_hessian(x64, num_microbatches):
    model = Net(nnx.Rngs(0), jnp.float64)
    model.eval()  # the helper sets BatchNorm to training mode itself
    batch = make_batch(jnp.float64)
    scores = gnnx.grasp_scores(model, loss_fn, batch, num_microbatches=num_microbatches)
    params, loss, _ = by_hand(model)
    expected = gj.grasp_scores(params, loss, batch, num_microbatches=num_microbatches)
    assert prunable_vector(scores).dtype == jnp.float64
    chex.assert_trees_all_close(scores, expected, rtol=1e-12, atol=1e-15)
    theta, _, hg, _ = explicit_g_hg(params, loss, batch, num_microbatches=num_microbatches)
    np.testing.assert_allclose(prunable_vector(scores), -theta * hg, rtol=1e-9, atol=1e-13)
    # Training-mode BatchNorm: these are not the scores with running averages.
    _, eval_loss, _ = by_hand(model, train=False)
    assert not np.allclose(prunable_vector(scores),
                           prunable_vector(gj.grasp_scores(params, eval_loss, batch,
                                                           num_microbatches=num_microbatches)))


def test_snip_scores_agree_with_functional_api(x64):
    model = Net(nnx.Rngs(1), jnp.float64)
    batch = make_batch(jnp.float64)
    params, loss, _ = by_hand(model)
    chex.assert_trees_all_close(gnnx.snip_scores(model, loss_fn, batch, num_microbatches=2),
                        gj.snip_scores(params, loss, batch, num_microbatches=2),
                        rtol=1e-12, atol=1e-15)


def test_batch_norm_eval_scores_with_running_averages(x64):
    model = Net(nnx.Rngs(2), jnp.float64)
    model.bn.mean[...] = jnp.array([0.5, -1.0, 2.0])  # so that eval and train differ
    batch = make_batch(jnp.float64)
    params, loss, _ = by_hand(model, train=False)
    chex.assert_trees_all_close(gnnx.grasp_scores(model, loss_fn, batch, batch_norm="eval"),
                        gj.grasp_scores(params, loss, batch), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="batch_norm must be 'train' or 'eval', got 'test'"):
        gnnx.grasp_scores(model, loss_fn, batch, batch_norm="test")


def test_synflow_scores_agree_with_functional_api_in_eval_mode(x64):
    model = Net(nnx.Rngs(3), jnp.float64)
    model.train()  # the helper scores in evaluation mode whatever the module is set to
    params, _, apply_eval = by_hand(model)
    scores = gnnx.synflow_scores(model, (5, 5, 2))
    chex.assert_trees_all_close(scores, gj.synflow_scores(params, apply_eval, (5, 5, 2)),
                        rtol=1e-12, atol=1e-15)
    assert float(jnp.min(scores["conv"]["kernel"][...])) >= 0.0
    assert float(jnp.max(scores["conv"]["kernel"][...])) > 0.0
    # A custom forward is what gets differentiated.
    doubled = gnnx.synflow_scores(model, (5, 5, 2), forward=lambda m, x: 2.0 * m(x), rescale=False)
    plain = gnnx.synflow_scores(model, (5, 5, 2), rescale=False)
    np.testing.assert_allclose(prunable_vector(doubled), 2.0 * prunable_vector(plain), rtol=1e-12)


class AxisNet(Net):
    """Net with its BatchNorm averaging over a pmap axis, as in Flax's ImageNet example."""

    def __init__(self, rngs):
        super().__init__(rngs)
        self.bn = nnx.BatchNorm(3, axis_name="batch", rngs=rngs)


def test_functional_options_pass_through_batch_axis_name():
    batch = make_batch()
    plain, bound = Net(nnx.Rngs(12)), AxisNet(nnx.Rngs(12))
    with pytest.raises(NameError, match="unbound axis name: batch"):
        gnnx.grasp_scores(bound, loss_fn, batch)
    np.testing.assert_allclose(
        prunable_vector(gnnx.grasp_scores(bound, loss_fn, batch, batch_axis_name="batch")),
        prunable_vector(gnnx.grasp_scores(plain, loss_fn, batch)), rtol=1e-5, atol=1e-8)


def test_magnitude_and_random_scores_have_the_param_structure():
    model = Net(nnx.Rngs(4))
    params = nnx.state(model, nnx.Param)
    mag = gnnx.magnitude_scores(model)
    assert jax.tree_util.tree_structure(mag) == jax.tree_util.tree_structure(params)
    np.testing.assert_array_equal(mag["conv"]["kernel"][...], jnp.abs(model.conv.kernel[...]))
    rnd = gnnx.random_scores(model, jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(rnd) == jax.tree_util.tree_structure(params)


# --------------------------------------------------------------------------
# The module is not changed; Dropout.


def test_scoring_leaves_batch_stats_rng_counts_and_modes_unchanged():
    model = Net(nnx.Rngs(5))
    model.eval()
    before = host_state(model)
    batch = make_batch()
    gnnx.grasp_scores(model, loss_fn, batch)
    gnnx.grasp_scores(model, loss_fn, batch, rngs=0, num_microbatches=2)
    gnnx.snip_scores(model, loss_fn, batch, rngs=nnx.Rngs(dropout=1))
    gnnx.synflow_scores(model, (5, 5, 2))
    chex.assert_trees_all_equal(before, host_state(model))
    assert model.bn.use_running_average is True and model.drop.deterministic is True
    # The check above can fail: a training-mode forward of the module itself moves them.
    model.train()
    model(batch["x"])
    assert not np.array_equal(host_state(model)["bn"]["mean"][...], before["bn"]["mean"][...])
    assert int(model.drop.rngs.count[...]) == int(before["drop"]["rngs"]["count"][...]) + 1


@pytest.mark.parametrize("dropout_rngs", [True, False])
def test_dropout_is_off_by_default_and_keyed_when_rngs_are_given(dropout_rngs):
    # With dropout_rngs=False the module's Dropout has no rngs of its own: a
    # training-mode call of it raises, scoring does not.
    model = Net(nnx.Rngs(6), dropout_rngs=dropout_rngs)
    batch = make_batch()
    off = prunable_vector(gnnx.grasp_scores(model, loss_fn, batch))
    params, loss, _ = by_hand(model)
    np.testing.assert_allclose(off, prunable_vector(gj.grasp_scores(params, loss, batch)),
                               rtol=1e-5, atol=1e-8)
    on = prunable_vector(gnnx.grasp_scores(model, loss_fn, batch, rngs=0))
    again = prunable_vector(gnnx.grasp_scores(model, loss_fn, batch, rngs=jax.random.key(0)))
    other = prunable_vector(gnnx.grasp_scores(model, loss_fn, batch, rngs=1))
    np.testing.assert_array_equal(on, again)
    scale = np.abs(off).max()
    assert np.abs(on - off).max() > 1e-2 * scale
    assert np.abs(on - other).max() > 1e-2 * scale
    with pytest.raises(TypeError, match="rngs must be None, an nnx.Rngs"):
        gnnx.grasp_scores(model, loss_fn, batch, rngs="seed")


def test_same_loss_and_model_structure_do_not_retrace():
    traces = []

    def counting_loss(model, batch):
        traces.append(1)  # runs only while tracing
        return loss_fn(model, batch)

    batch = make_batch()
    first = gnnx.grasp_scores(Net(nnx.Rngs(7)), counting_loss, batch)
    n = len(traces)
    second = gnnx.grasp_scores(Net(nnx.Rngs(8)), counting_loss, batch)
    assert len(traces) == n, "a second module of the same structure retraced"
    assert not np.allclose(prunable_vector(first), prunable_vector(second))


def test_reachable_as_gj_nnx():
    assert gj.nnx is gnnx


def test_bad_model_and_loss_raise():
    with pytest.raises(TypeError, match="model must be an nnx.Module, got dict"):
        gnnx.grasp_scores({"kernel": jnp.ones((2, 2))}, loss_fn, make_batch())
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        gnnx.snip_scores(Net(nnx.Rngs(0)), None, make_batch())


# --------------------------------------------------------------------------
# Masks, nnx.Optimizer and training.


def test_masks_fit_nnx_optimizer_and_pruned_weights_stay_zero():
    model = Net(nnx.Rngs(9))
    batch = make_batch()
    masks = gj.masks_from_scores(gnnx.grasp_scores(model, loss_fn, batch), 0.6, direction="highest")
    gnnx.apply_masks(model, masks)
    tx = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.5, momentum=0.9),
                     gj.masked_updates(masks))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)  # refused masks of the whole state before

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return loss

    model.train()
    start = model.conv.kernel[...]
    losses = [float(step(model, optimizer, batch)) for _ in range(4)]
    assert losses[-1] < losses[0]
    for name in ("conv", "head"):
        kernel = np.asarray(getattr(model, name).kernel[...])
        keep = np.asarray(masks[name]["kernel"][...])
        assert (~keep).sum() > 0
        assert np.all(kernel[~keep] == 0.0)
    kept = np.asarray(masks["conv"]["kernel"][...])
    assert not np.allclose(np.asarray(model.conv.kernel[...])[kept], np.asarray(start)[kept])
    report = gj.sparsity_report(masks)
    assert report.kept == report.total - round(0.6 * report.total)


def test_apply_masks_in_place_and_structure_checked():
    model = Net(nnx.Rngs(10))
    bias = np.asarray(model.conv.bias[...])
    masks = gj.masks_from_scores(gnnx.magnitude_scores(model), 0.5, direction="lowest")
    assert gnnx.apply_masks(model, masks) is None
    keep = np.asarray(masks["conv"]["kernel"][...])
    assert np.all(np.asarray(model.conv.kernel[...])[~keep] == 0.0)
    assert np.all(np.asarray(model.conv.kernel[...])[keep] != 0.0)
    np.testing.assert_array_equal(model.conv.bias[...], bias)
    whole = gj.masks_from_scores(gj.magnitude_scores(nnx.state(model)), 0.5, direction="lowest")
    with pytest.raises(ValueError, match="masks and params differ in structure"):
        gnnx.apply_masks(model, whole)


def test_iterative_prune_rescoring_the_masked_module():
    model = Net(nnx.Rngs(11))
    before = host_state(model)
    seen = []

    def score(m):
        seen.append(float(jnp.mean(m.conv.kernel[...] == 0)))
        return gnnx.synflow_scores(m, (5, 5, 2))

    masks = gnnx.prune(model, score, 0.8, direction="lowest", rounds=3)
    report = gj.sparsity_report(masks)
    assert report.total - report.kept == round(0.8 * report.total)
    assert seen[0] == 0.0 and seen[-1] > 0.0  # later rounds see the pruned weights at 0
    chex.assert_trees_all_equal(before, host_state(model))
