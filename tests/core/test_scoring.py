"""grasp_scores and the baselines against explicit math on tiny models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import grasp_jax as gj

from tests.helpers.tiny_models import (
    convbn_setup,
    explicit_g_hg,
    make_batch,
    mlp_loss,
    mlp_params,
    prunable_vector,
)

# --------------------------------------------------------------------------


def test_hg_matches_explicit_hessian_mlp(x64):
    params = mlp_params(jax.random.PRNGKey(0), dtype=jnp.float64)
    batch = make_batch(jax.random.PRNGKey(1), dtype=jnp.float64)
    theta, g, hg, _ = explicit_g_hg(params, mlp_loss, batch)
    g_tree, hg_tree = gj.gradient_and_hvp(params, mlp_loss, batch)
    np.testing.assert_allclose(prunable_vector(g_tree), g, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(prunable_vector(hg_tree), hg, rtol=1e-10, atol=1e-12)
    scores = gj.grasp_scores(params, mlp_loss, batch)
    assert prunable_vector(scores).dtype == jnp.float64
    # S(-θ) = -θ ⊙ Hg: the minus sign is part of the definition.
    np.testing.assert_allclose(prunable_vector(scores), -theta * hg, rtol=1e-10, atol=1e-12)
    # Non-prunable leaves get zeros.
    assert float(jnp.abs(scores["dense0"]["bias"]).max()) == 0.0


def test_hg_matches_explicit_hessian_conv_batchnorm(x64):
    params, loss, batch = convbn_setup()
    theta, g, hg, _ = explicit_g_hg(params, loss, batch)
    scores = gj.grasp_scores(params, loss, batch)
    np.testing.assert_allclose(prunable_vector(scores), -theta * hg, rtol=1e-9, atol=1e-12)
    # Two prunable kernels (conv + dense); BatchNorm scale/bias and the dense bias are not.
    assert sum(gj.prunable.prunable_flags(params)) == 2


def test_scores_use_prunable_block_not_full_hessian(x64):
    """Biases are held fixed: Hg = H_θθ g_θ, not (H g)_θ over all params."""
    params = mlp_params(jax.random.PRNGKey(2), dtype=jnp.float64)
    batch = make_batch(jax.random.PRNGKey(3), dtype=jnp.float64)
    theta, _, hg_block, _ = explicit_g_hg(params, mlp_loss, batch)

    flat_all, unravel_all = ravel_pytree(params)
    lf = lambda v: mlp_loss(unravel_all(v), batch)
    hg_full_tree = unravel_all(jax.jit(jax.hessian(lf))(flat_all) @ jax.jit(jax.grad(lf))(flat_all))
    hg_full = prunable_vector(hg_full_tree)
    # The model is chosen so that the two really differ ...
    assert np.max(np.abs(hg_full - hg_block)) > 1e-3 * np.max(np.abs(hg_block))
    # ... and the scores follow the prunable block.
    scores = prunable_vector(gj.grasp_scores(params, mlp_loss, batch))
    np.testing.assert_allclose(scores, -theta * hg_block, rtol=1e-10, atol=1e-12)
    assert not np.allclose(scores, -theta * hg_full, rtol=1e-6)


def test_score_predicts_change_in_gradient_norm(x64):
    """First order: removing weight i changes gᵀg by ≈ 2·S(-θ)_i. Catches a flipped sign."""
    params = mlp_params(jax.random.PRNGKey(4), sizes=(6, 6, 3), dtype=jnp.float64, scale=0.05)
    batch = make_batch(jax.random.PRNGKey(5), d=6, classes=3, dtype=jnp.float64)
    theta, _, _, unravel = explicit_g_hg(params, mlp_loss, batch)
    flags = gj.prunable.prunable_flags(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def gnorm2(v):
        it = iter(unravel(v))
        full = jax.tree_util.tree_unflatten(
            treedef, [next(it) if f else x for x, f in zip(leaves, flags)])
        g, _ = gj.gradient_and_hvp(full, mlp_loss, batch)
        return float(jnp.sum(prunable_vector(g) ** 2))

    base = gnorm2(theta)
    actual = np.array([(gnorm2(theta.at[i].set(0.0)) - base) / 2 for i in range(theta.size)])
    predicted = np.asarray(prunable_vector(gj.grasp_scores(params, mlp_loss, batch)))
    assert np.corrcoef(actual, predicted)[0, 1] > 0.99
    big = np.abs(predicted) > 0.2 * np.abs(predicted).max()
    assert np.all(np.sign(actual[big]) == np.sign(predicted[big]))


def test_microbatches_sum_per_chunk_computations(x64):
    params, loss, batch = convbn_setup(n=8)
    theta, g2, hg2, _ = explicit_g_hg(params, loss, batch, num_microbatches=2)
    g_tree, hg_tree = gj.gradient_and_hvp(params, loss, batch, num_microbatches=2)
    np.testing.assert_allclose(prunable_vector(g_tree), g2, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(prunable_vector(hg_tree), hg2, rtol=1e-9, atol=1e-12)
    s1 = prunable_vector(gj.grasp_scores(params, loss, batch, num_microbatches=1))
    s2 = prunable_vector(gj.grasp_scores(params, loss, batch, num_microbatches=2))
    np.testing.assert_allclose(s2, -theta * hg2, rtol=1e-9, atol=1e-12)
    # BatchNorm statistics are per chunk, so one chunk of 8 is not two of 4.
    assert not np.allclose(s1, s2, rtol=1e-3)
    # Inside a user's jit the chunks are looped in the trace instead of on the host.
    traced = jax.jit(lambda p, b: gj.grasp_scores(p, loss, b, num_microbatches=2))(params, batch)
    np.testing.assert_allclose(prunable_vector(traced), s2, rtol=1e-9, atol=1e-12)
    g_jit, _ = jax.jit(lambda p, b: gj.gradient_and_hvp(p, loss, b, num_microbatches=2))(
        params, batch)
    np.testing.assert_allclose(prunable_vector(g_jit), g2, rtol=1e-9, atol=1e-12)


def test_microbatches_without_batchnorm_scale_like_the_sum(x64):
    params = mlp_params(jax.random.PRNGKey(6), dtype=jnp.float64)
    batch = make_batch(jax.random.PRNGKey(7), n=12, dtype=jnp.float64)
    theta, _, hg3, _ = explicit_g_hg(params, mlp_loss, batch, num_microbatches=3)
    s3 = prunable_vector(gj.grasp_scores(params, mlp_loss, batch, num_microbatches=3))
    np.testing.assert_allclose(s3, -theta * hg3, rtol=1e-9, atol=1e-12)


def test_float32_scores_keep_dtype_and_agree_with_float64():
    params = mlp_params(jax.random.PRNGKey(0))
    batch = make_batch(jax.random.PRNGKey(1))
    s32 = gj.grasp_scores(params, mlp_loss, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(s32))
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)
        b64 = {"x": batch["x"].astype(jnp.float64), "y": batch["y"]}
        s64 = prunable_vector(gj.grasp_scores(p64, mlp_loss, b64))
    np.testing.assert_allclose(prunable_vector(s32), s64, rtol=1e-3, atol=1e-6)


def test_works_under_jit_and_does_not_retrace():
    traces = []

    def loss(params, batch):
        traces.append(1)  # runs only while tracing
        return mlp_loss(params, batch)

    params = mlp_params(jax.random.PRNGKey(0))
    batch = make_batch(jax.random.PRNGKey(1))
    s1 = gj.grasp_scores(params, loss, batch)
    n_after_first = len(traces)
    assert n_after_first > 0
    params2 = jax.tree_util.tree_map(lambda x: x * 1.1, params)
    s2 = gj.grasp_scores(params2, loss, batch)
    assert len(traces) == n_after_first, "second call with the same shapes retraced"
    assert not np.allclose(prunable_vector(s1), prunable_vector(s2))
    jitted = jax.jit(lambda p, b: gj.grasp_scores(p, loss, b))(params, batch)
    np.testing.assert_allclose(prunable_vector(jitted), prunable_vector(s1), rtol=1e-5, atol=1e-7)


def test_prunable_as_callable_and_as_tree(x64):
    params = mlp_params(jax.random.PRNGKey(0), dtype=jnp.float64)
    batch = make_batch(jax.random.PRNGKey(1), dtype=jnp.float64)
    only_first = lambda path, leaf: gj.prunable.path_name(path) == "dense0/kernel"
    s_callable = gj.grasp_scores(params, mlp_loss, batch, prunable=only_first)
    tree = jax.tree_util.tree_map_with_path(only_first, params)
    s_tree = gj.grasp_scores(params, mlp_loss, batch, prunable=tree)
    assert float(jnp.abs(s_callable["dense1"]["kernel"]).max()) == 0.0
    np.testing.assert_allclose(s_callable["dense0"]["kernel"], s_tree["dense0"]["kernel"])
    # With dense1/kernel held fixed, dense0's scores use a smaller Hessian block.
    s_default = gj.grasp_scores(params, mlp_loss, batch)
    assert not np.allclose(s_default["dense0"]["kernel"], s_callable["dense0"]["kernel"])


def test_bad_inputs_raise_clear_errors():
    params = mlp_params(jax.random.PRNGKey(0))
    batch = make_batch(jax.random.PRNGKey(1), n=8)
    with pytest.raises(ValueError, match="batch size 8 is not divisible by num_microbatches=3"):
        gj.grasp_scores(params, mlp_loss, batch, num_microbatches=3)
    with pytest.raises(ValueError, match="scalar"):
        gj.grasp_scores(params, lambda p, b: jnp.ones(3) * mlp_loss(p, b), batch)
    with pytest.raises(ValueError, match="no prunable leaf"):
        # ("w", Haiku's name for a weight, would be prunable.)
        gj.grasp_scores({"gamma": jnp.ones((3, 3))},
                        lambda p, b: jnp.sum(p["gamma"]) * b["x"].sum(), batch)
    with pytest.raises(ValueError, match="num_microbatches"):
        gj.snip_scores(params, mlp_loss, batch, num_microbatches=0)
    with pytest.raises(ValueError, match="structure"):
        gj.grasp_scores(params, mlp_loss, batch, prunable={"dense0": True})


# --------------------------------------------------------------------------
# Flax Linen / NNX / plain dict.


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="dense1")(jnp.tanh(nn.Dense(5, name="dense0")(x)))


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.dense0 = nnx.Linear(6, 5, rngs=rngs)
        self.dense1 = nnx.Linear(5, 4, rngs=rngs)

    def __call__(self, x):
        return self.dense1(jnp.tanh(self.dense0(x)))


def test_linen_nnx_and_plain_dict_agree():
    batch = make_batch(jax.random.PRNGKey(1))
    linen = LinenMLP()
    lp = linen.init(jax.random.PRNGKey(0), batch["x"])["params"]
    def linen_loss(p, b):
        return gj.cross_entropy_with_temperature(linen.apply({"params": p}, b["x"]), b["y"])

    s_linen = gj.grasp_scores(lp, linen_loss, batch)

    plain = jax.tree_util.tree_map(lambda x: x, dict(lp))
    s_plain = gj.grasp_scores(plain, mlp_loss, batch)

    model = NNXMLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    # Same weights as the Linen model.
    for layer in ("dense0", "dense1"):
        for leaf in ("kernel", "bias"):
            state[layer][leaf][...] = lp[layer][leaf]

    def nnx_loss(p, b):
        return gj.cross_entropy_with_temperature(nnx.merge(graphdef, p)(b["x"]), b["y"])

    s_nnx = gj.grasp_scores(state, nnx_loss, batch)
    assert jax.tree_util.tree_structure(s_nnx) == jax.tree_util.tree_structure(state)
    for layer in ("dense0", "dense1"):
        np.testing.assert_allclose(s_linen[layer]["kernel"], s_plain[layer]["kernel"],
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(s_nnx[layer]["kernel"][...], s_linen[layer]["kernel"],
                                   rtol=1e-5, atol=1e-7)
    masks = gj.masks_from_scores(s_nnx, 0.5, direction="highest")
    assert gj.sparsity_report(masks).kept == (6 * 5 + 5 * 4) // 2


class NNXConvBN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 3, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs)
        self.head = nnx.Linear(3, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2)))


def test_nnx_batchnorm_model_in_training_mode_scores():
    model = NNXConvBN(nnx.Rngs(0))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 5, 5, 2))
    batch = {"x": x, "y": jnp.arange(8) % 4}

    def loss(p, b):
        # A fresh copy of the non-param state inside the trace: merging the
        # captured one would leak tracers into it when BatchNorm updates it.
        m = nnx.merge(graphdef, p, jax.tree_util.tree_map(jnp.array, rest))
        return gj.cross_entropy_with_temperature(m(b["x"]), b["y"], 200.0)

    s1 = gj.grasp_scores(params, loss, batch)
    s2 = gj.grasp_scores(params, loss, batch, num_microbatches=2)
    k1, k2 = s1["conv"]["kernel"][...], s2["conv"]["kernel"][...]
    assert np.all(np.isfinite(k1)) and np.abs(k1).max() > 0
    assert not np.allclose(k1, k2)  # per-chunk batch statistics
    assert float(jnp.abs(s1["bn"]["scale"][...]).max()) == 0.0


# --------------------------------------------------------------------------
# Baselines.


def test_snip_is_abs_theta_times_summed_gradient(x64):
    params = mlp_params(jax.random.PRNGKey(0), dtype=jnp.float64)
    batch = make_batch(jax.random.PRNGKey(1), dtype=jnp.float64)
    theta, g, _, _ = explicit_g_hg(params, mlp_loss, batch, num_microbatches=2)
    s = prunable_vector(gj.snip_scores(params, mlp_loss, batch, num_microbatches=2))
    np.testing.assert_allclose(s, np.abs(theta * g), rtol=1e-10, atol=1e-14)
    s_jit = jax.jit(lambda p, b: gj.snip_scores(p, mlp_loss, b, num_microbatches=2))(params, batch)
    np.testing.assert_allclose(prunable_vector(s_jit), s, rtol=1e-10, atol=1e-14)


def relu_net(params, x):
    names = sorted(params)
    for i, n in enumerate(names):
        x = x @ params[n]["kernel"]
        if i < len(names) - 1:
            x = jax.nn.relu(x)
    return x


def test_synflow_matches_definition_and_rescaling_keeps_ranking(x64):
    key = jax.random.PRNGKey(0)
    params = {f"l{i}": {"kernel": jax.random.normal(k, (4, 4), jnp.float64)}
              for i, k in enumerate(jax.random.split(key, 3))}
    # Definition: R = 1ᵀ f(1; |θ|), score = |θ ⊙ ∂R/∂θ|.
    absp = jax.tree_util.tree_map(jnp.abs, params)
    grads = jax.grad(lambda p: relu_net(p, jnp.ones((1, 4))).sum())(absp)
    expected = prunable_vector(jax.tree_util.tree_map(lambda t, g: jnp.abs(t * g), absp, grads))
    plain = prunable_vector(gj.synflow_scores(params, relu_net, (4,), rescale=False))
    np.testing.assert_allclose(plain, expected, rtol=1e-12)
    scaled = prunable_vector(gj.synflow_scores(params, relu_net, (4,), rescale=True))
    ratio = scaled / plain
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)  # one global constant


def test_synflow_rescaling_prevents_overflow_in_deep_nets():
    keys = jax.random.split(jax.random.PRNGKey(0), 25)
    params = {f"l{i:02d}": {"kernel": 0.5 + jax.random.uniform(k, (64, 64))}
              for i, k in enumerate(keys)}
    plain = prunable_vector(gj.synflow_scores(params, relu_net, (64,), rescale=False))
    assert not np.all(np.isfinite(plain))  # 25 layers of gain ~64 overflow float32
    scaled = prunable_vector(gj.synflow_scores(params, relu_net, (64,)))
    assert np.all(np.isfinite(scaled)) and scaled.max() > 0


def test_magnitude_and_random_scores():
    params = mlp_params(jax.random.PRNGKey(0))
    mag = gj.magnitude_scores(params)
    np.testing.assert_array_equal(mag["dense0"]["kernel"], jnp.abs(params["dense0"]["kernel"]))
    assert float(mag["dense0"]["bias"].max()) == 0.0
    r1 = gj.random_scores(params, jax.random.PRNGKey(3))
    r2 = gj.random_scores(params, jax.random.PRNGKey(3))
    r3 = gj.random_scores(params, jax.random.PRNGKey(4))
    np.testing.assert_array_equal(prunable_vector(r1), prunable_vector(r2))
    assert not np.allclose(prunable_vector(r1), prunable_vector(r3))


def test_temperature_divides_logits():
    logits = jnp.array([[2.0, -1.0, 0.5]])
    labels = jnp.array([0])
    direct = -jax.nn.log_softmax(logits / 200.0)[0, 0]
    np.testing.assert_allclose(gj.cross_entropy_with_temperature(logits, labels, 200.0), direct,
                               rtol=1e-6)
