"""The fast convolution equals lax.conv_general_dilated: values, gradients, HVPs."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from grasp_jax.models import conv as conv_lib
from grasp_jax.models.barrier import fusion_barrier
from grasp_jax.models.conv import (
    FAST_CONV_ENV,
    PATCHES_SCOPE,
    conv_general_dilated,
    fast_path_wins,
    resolve_mode,
    uses_fast_path,
)

from tests.helpers.lowering import exported_text, has_barrier, has_patches, op_count

# Float64 makes agreement a check of the math, not of rounding.
pytestmark = pytest.mark.usefixtures("x64")


def _spec(layout: str, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[ch] for ch in layout)


def _operands(
    lhs_layout: str,
    rhs_layout: str,
    n: int,
    c: int,
    spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    o: int,
    groups: int = 1,
    seed: int = 0,
    dtype: Any = jnp.float64,
):
    """Random lhs, rhs in the given layouts, e.g. 'NHWC', 'HWIO'."""
    rng = np.random.default_rng(seed)
    sp_names = "HWD"[: len(spatial)]
    x_sizes = {"N": n, "C": c, **dict(zip(sp_names, spatial))}
    k_sizes = {"I": c // groups, "O": o, **dict(zip(sp_names, kernel))}
    x = rng.normal(size=_spec(lhs_layout, x_sizes))
    k = rng.normal(size=_spec(rhs_layout, k_sizes))
    return jnp.asarray(x, dtype), jnp.asarray(k, dtype)


# (name, operand args, conv kwargs).  All of these take the fast path with
# mode='fast'; test_fast_path_is_taken checks that.
NHWC = ("NHWC", "HWIO", "NHWC")
CASES = [
    (
        "1x1_kernel",
        ("NHWC", "HWIO", 2, 3, (4, 5), (1, 1), 4),
        dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC),
    ),
    (
        "3x3_same_2x2_map",
        ("NHWC", "HWIO", 3, 4, (2, 2), (3, 3), 5),
        dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC),
    ),
    (
        "3x3_same_1x1_map",
        ("NHWC", "HWIO", 3, 4, (1, 1), (3, 3), 2),
        dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC),
    ),
    (
        "3x3_same_odd_map",
        ("NHWC", "HWIO", 2, 3, (5, 7), (3, 3), 2),
        dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC),
    ),
    (
        "valid_rect_kernel",
        ("NHWC", "HWIO", 2, 3, (5, 4), (3, 2), 2),
        dict(window_strides=(1, 1), padding="VALID", dimension_numbers=NHWC),
    ),
    (
        "explicit_asym_negative_pad",
        ("NHWC", "HWIO", 2, 2, (5, 6), (3, 3), 3),
        dict(window_strides=(1, 1), padding=[(2, 0), (-1, 3)], dimension_numbers=NHWC),
    ),
    (
        "one_channel",
        ("NHWC", "HWIO", 2, 1, (3, 3), (3, 3), 1),
        dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC),
    ),
    (
        "stride_2",
        ("NHWC", "HWIO", 2, 3, (7, 6), (3, 3), 2),
        dict(window_strides=(2, 2), padding="SAME", dimension_numbers=NHWC),
    ),
    (
        "kernel_dilation",
        ("NHWC", "HWIO", 2, 3, (7, 6), (3, 3), 2),
        dict(window_strides=(1, 2), padding="SAME", rhs_dilation=(2, 3), dimension_numbers=NHWC),
    ),
    (
        "input_dilation",
        ("NHWC", "HWIO", 2, 3, (4, 3), (3, 3), 2),
        dict(
            window_strides=(1, 1),
            padding=[(1, 2), (2, 1)],
            lhs_dilation=(2, 3),
            dimension_numbers=NHWC,
        ),
    ),
    (
        "feature_groups_same_lower",
        ("NHWC", "HWIO", 2, 6, (5, 4), (3, 3), 4),
        dict(
            window_strides=(2, 1),
            padding="SAME_LOWER",
            feature_group_count=2,
            dimension_numbers=NHWC,
        ),
    ),
    (
        "default_nchw_layout",
        ("NCHW", "OIHW", 2, 4, (2, 3), (3, 3), 3),
        dict(window_strides=(1, 1), padding="SAME", dimension_numbers=None),
    ),
    (
        "mixed_layout",
        ("NCHW", "HWIO", 2, 4, (2, 3), (3, 3), 3),
        dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NCHW", "HWIO", "NHWC")),
    ),
    (
        "1d",
        ("NHC", "HIO", 2, 3, (5,), (3,), 2),
        dict(window_strides=(1,), padding="SAME", dimension_numbers=("NHC", "HIO", "NHC")),
    ),
    (
        "only_padding_rows",
        ("NHWC", "HWIO", 2, 3, (3, 3), (3, 3), 2),
        dict(window_strides=(1, 1), padding=[(5, 0), (0, 0)], dimension_numbers=NHWC),
    ),
    (
        "all_padding",
        ("NHWC", "HWIO", 2, 3, (1, 1), (1, 1), 2),
        dict(window_strides=(2, 2), padding=[(3, 0), (3, 0)], dimension_numbers=NHWC),
    ),
]


def _case(name: str):
    _, operand_args, kwargs = next(c for c in CASES if c[0] == name)
    lhs_layout, rhs_layout, n, c, spatial, kernel, o = operand_args
    groups = kwargs.get("feature_group_count", 1)
    x, k = _operands(lhs_layout, rhs_layout, n, c, spatial, kernel, o, groups)
    return x, k, kwargs


NAMES = [c[0] for c in CASES]


@pytest.mark.parametrize("name", NAMES)
def test_fast_path_is_taken(name):
    x, k, kwargs = _case(name)
    assert uses_fast_path(x, k, mode="fast", **kwargs)
    fast = functools.partial(conv_general_dilated, mode="fast", **kwargs)
    # Neither the function nor its derivatives may call the native conv.
    jaxpr = str(
        jax.make_jaxpr(jax.grad(lambda x, k: jnp.sum(fast(x, k) ** 2), argnums=(0, 1)))(x, k)
    )
    assert "conv_general_dilated" not in jaxpr


def _value_grad_hvp(conv, x, k, w, vx, vk):
    """(y, ∇x, ∇k, (H·v)x, (H·v)k) of a loss through ``conv``."""

    def loss(x, k):
        # Quadratic in the conv output, so H·v has data and kernel cross terms.
        return jnp.sum(w * conv(x, k) ** 2)

    # Forward-over-reverse, the way grasp_scores computes H·v.
    g, hv = jax.jvp(jax.grad(loss, argnums=(0, 1)), (x, k), (vx, vk))
    return (conv(x, k), *g, *hv)


def _assert_matches_native(conv, native, x, k, rng):
    """Value, both gradients and both HVP parts of ``conv`` equal ``native``'s (float64)."""
    y_shape = jax.eval_shape(native, x, k).shape
    w, vx, vk = (jnp.asarray(rng.normal(size=s)) for s in (y_shape, x.shape, k.shape))
    # One compiled program for both, as compiling dominates these tests' time.
    got, want = jax.jit(lambda *a: (_value_grad_hvp(conv, *a), _value_grad_hvp(native, *a)))(
        x, k, w, vx, vk
    )
    for what, a, b in zip(["value", "grad x", "grad k", "hvp x", "hvp k"], got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, what
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=what)


@pytest.mark.parametrize("name", NAMES)
def test_value_gradients_and_hvp_match_native(name):
    x, k, kwargs = _case(name)
    fast = functools.partial(conv_general_dilated, mode="fast", **kwargs)
    native = functools.partial(lax.conv_general_dilated, **kwargs)
    _assert_matches_native(fast, native, x, k, np.random.default_rng(1))


def test_vmap_matches_native():
    x, k, kwargs = _case("3x3_same_2x2_map")
    xs = jnp.stack([x, 2 * x + 1, -x])
    ks = jnp.stack([k, -k])
    fast = functools.partial(conv_general_dilated, mode="fast", **kwargs)
    native = functools.partial(lax.conv_general_dilated, **kwargs)

    def both(conv):
        return jax.jit(
            lambda xs, ks: (
                jax.vmap(conv, (0, None))(xs, ks[0]),
                jax.vmap(conv, (None, 0))(xs[0], ks),
            )
        )

    for a, b in zip(both(fast)(xs, ks), both(native)(xs, ks)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_low_precision_accumulates_like_native():
    x, k, kwargs = _case("3x3_same_2x2_map")
    xb, kb = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    fast = jax.jit(functools.partial(conv_general_dilated, mode="fast", **kwargs))(xb, kb)
    native = jax.jit(functools.partial(lax.conv_general_dilated, **kwargs))(xb, kb)
    assert fast.dtype == native.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        fast.astype(jnp.float32), native.astype(jnp.float32), rtol=2e-2, atol=5e-2
    )
    wide = jax.eval_shape(
        functools.partial(
            conv_general_dilated, mode="fast", preferred_element_type=jnp.float32, **kwargs
        ),
        xb,
        kb,
    )
    assert wide.dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs, make",
    [
        # Batch groups only arise in native gradients of grouped convs.
        (
            dict(
                window_strides=(1, 1), padding="SAME", batch_group_count=2, dimension_numbers=NHWC
            ),
            lambda: _operands("NHWC", "HWIO", 4, 3, (3, 3), (3, 3), 4),
        ),
        # Integer convolutions keep XLA's exact integer arithmetic.
        (
            dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC),
            lambda: _operands("NHWC", "HWIO", 2, 3, (2, 2), (3, 3), 2, dtype=jnp.int32),
        ),
    ],
)
def test_unsupported_calls_fall_back_to_native(kwargs, make):
    x, k = make()
    assert not uses_fast_path(x, k, mode="fast", **kwargs)
    np.testing.assert_array_equal(
        conv_general_dilated(x, k, mode="fast", **kwargs), lax.conv_general_dilated(x, k, **kwargs)
    )


def test_invalid_calls_raise_lax_errors():
    x, k = _operands("NHWC", "HWIO", 2, 3, (4, 4), (3, 3), 2)
    # lax refuses string padding with input dilation; so must we.
    with pytest.raises(ValueError, match="String padding"):
        conv_general_dilated(
            x, k, (1, 1), "SAME", lhs_dilation=(2, 2), dimension_numbers=NHWC, mode="fast"
        )
    with pytest.raises(ValueError, match="feature"):  # channel mismatch
        conv_general_dilated(x, k[:, :, :2], (1, 1), "SAME", dimension_numbers=NHWC, mode="fast")


def test_fast_path_wins_rule():
    assert fast_path_wins((2, 2), (3, 3), 512)  # VGG19's last convs on CIFAR
    assert fast_path_wins((1, 1), (3, 3), 16)
    assert fast_path_wins((4, 8), (5, 5), 64)
    assert fast_path_wins((32, 32), (1, 1), 64)  # pointwise: a plain matmul
    assert not fast_path_wins((3, 3), (3, 3), 512)
    assert not fast_path_wins((32, 32), (3, 3), 64)
    assert not fast_path_wins((2, 2), (3, 3), 3)  # too thin to beat XLA
    assert not fast_path_wins((32, 32), (1, 1), 3)


def _decides_fast(
    size: int, ksize: int, mode: str | None = None, channels: int = 16, platform: str = "cpu",
    **kwargs: Any
) -> bool:
    x = jax.ShapeDtypeStruct((8, size, size, channels), jnp.float32)
    k = jax.ShapeDtypeStruct((ksize, ksize, channels, 4), jnp.float32)
    return uses_fast_path(x, k, (1, 1), "SAME", dimension_numbers=NHWC, mode=mode,
                          platform=platform, **kwargs)


def test_auto_mode_follows_platform_and_rule():
    assert _decides_fast(2, 3, "auto")
    assert _decides_fast(8, 1, "auto")
    assert not _decides_fast(8, 3, "auto")
    assert not _decides_fast(2, 3, "auto", channels=3)
    # Input dilation widens the input the window slides over.
    x = jax.ShapeDtypeStruct((8, 2, 2, 16), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 16, 4), jnp.float32)
    assert not uses_fast_path(
        x, k, (1, 1), [(1, 1), (1, 1)], lhs_dilation=(2, 2), dimension_numbers=NHWC, mode="auto",
        platform="cpu",
    )
    # Accelerators keep their native convolutions; a forced mode is the same everywhere.
    for accelerator in ("cuda", "rocm", "tpu"):
        assert not _decides_fast(2, 3, "auto", platform=accelerator)
        assert _decides_fast(2, 3, "fast", platform=accelerator)
    # Without a platform: the default backend's, where a plain jax.jit call runs.
    assert _decides_fast(2, 3, "auto", platform=None) == (jax.default_backend() == "cpu")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("0", "native"),
        ("native", "native"),
        ("1", "fast"),
        ("FAST", "fast"),
        ("auto", "auto"),
        ("", "auto"),
    ],
)
def test_environment_variable_sets_mode(monkeypatch, value, expected):
    monkeypatch.setenv(FAST_CONV_ENV, value)
    assert resolve_mode() == expected
    assert resolve_mode("native") == "native"  # an explicit mode wins


def test_environment_variable_controls_default_calls(monkeypatch):
    monkeypatch.setenv(FAST_CONV_ENV, "0")
    assert not _decides_fast(2, 3)
    monkeypatch.setenv(FAST_CONV_ENV, "1")
    assert _decides_fast(8, 3)
    monkeypatch.delenv(FAST_CONV_ENV)
    assert _decides_fast(2, 3) and not _decides_fast(8, 3)


def test_bad_mode_names_the_value(monkeypatch):
    monkeypatch.setenv(FAST_CONV_ENV, "sometimes")
    with pytest.raises(ValueError, match="sometimes"):
        resolve_mode()
    with pytest.raises(ValueError, match="quick"):
        resolve_mode("quick")


@pytest.mark.parametrize("padding", ["SAME", "VALID", "CIRCULAR", 1])
def test_flax_conv_gives_same_output(padding):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 2, 3)))
    kwargs = dict(features=4, kernel_size=(3, 3), padding=padding, param_dtype=jnp.float64)
    layer = nn.Conv(**kwargs)
    # Random parameters without compiling an initializer (slow in float64).
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape)),
        jax.eval_shape(layer.init, jax.random.key(0), x),
    )
    ours = nn.Conv(
        conv_general_dilated=functools.partial(conv_general_dilated, mode="fast"), **kwargs
    )
    np.testing.assert_allclose(
        jax.jit(ours.apply)(params, x), jax.jit(layer.apply)(params, x), rtol=1e-12, atol=1e-12
    )


def test_flax_conv_auto_takes_fast_path_only_where_lowered_for_cpu(monkeypatch):
    monkeypatch.delenv(FAST_CONV_ENV, raising=False)
    x = jnp.zeros((2, 2, 2, 16))  # a 3x3 window over a 2x2 map
    layer = nn.Conv(4, (3, 3), conv_general_dilated=conv_general_dilated)
    params = jax.eval_shape(layer.init, jax.random.key(0), x)
    # One traced function; the platform it is lowered for picks the path.
    on_cpu = exported_text(layer.apply, params, x, platform="cpu")
    assert op_count(on_cpu, "convolution") == 0 and op_count(on_cpu, "dot_general") == 1
    assert has_patches(on_cpu) and has_barrier(on_cpu)
    for accelerator in ("cuda", "tpu"):
        text = exported_text(layer.apply, params, x, platform=accelerator)
        assert op_count(text, "convolution") == 1 and op_count(text, "dot_general") == 0
        assert not has_patches(text) and not has_barrier(text)
        assert PATCHES_SCOPE not in text


def test_module_exports():
    assert set(conv_lib.__all__) >= {
        "conv_general_dilated",
        "uses_fast_path",
        "fast_path_wins",
        "FAST_CONV_ENV",
    }


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_auto_mode_computes_1x1_values_natively_and_derivatives_as_matmuls(strides):
    # XLA:CPU's 1x1 forward is as fast as a matmul (so the eval forward stays native) but its
    # kernel gradient is slow (so every derivative comes from the patches formulation).
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 16)))
    k = jnp.asarray(rng.normal(size=(1, 1, 16, 8)))
    kwargs = dict(window_strides=strides, padding="VALID", dimension_numbers=NHWC)
    auto = functools.partial(conv_general_dilated, mode="auto", **kwargs)
    native = functools.partial(lax.conv_general_dilated, **kwargs)
    assert uses_fast_path(x, k, mode="auto", platform="cpu", **kwargs)
    on_cpu = functools.partial(exported_text, platform="cpu")
    assert op_count(on_cpu(auto, x, k), "convolution") == 1
    grad_auto = jax.grad(lambda x, k: jnp.sum(auto(x, k) ** 2), argnums=(0, 1))
    grads = on_cpu(grad_auto, x, k)
    assert op_count(grads, "convolution") == 1  # the value; the backward pass is matmuls
    native_grads = on_cpu(jax.grad(lambda x, k: jnp.sum(native(x, k) ** 2), argnums=(0, 1)), x, k)
    assert op_count(native_grads, "convolution") == 3
    # Lowered for a GPU the same gradient is XLA's three convolutions and no matmul.
    on_gpu = exported_text(grad_auto, x, k, platform="cuda")
    assert op_count(on_gpu, "convolution") == 3 and op_count(on_gpu, "dot_general") == 0

    _assert_matches_native(auto, native, x, k, rng)
    # A frozen input (no tangent) costs no matmul for it: only the kernel's tangent is formed.
    only_k = on_cpu(jax.grad(lambda k: jnp.sum(auto(x, k) ** 2)), k)
    assert op_count(only_k, "dot_general") < op_count(grads, "dot_general")


def test_fusion_barrier_is_the_identity_for_values_and_derivatives():
    rng = np.random.default_rng(0)
    x, v = (jnp.asarray(rng.normal(size=(3, 4))) for _ in range(2))

    def loss(x, barrier):
        y = jnp.sin(2.0 * x)
        return jnp.sum(jnp.cos(barrier(y)) * y)

    with_barrier = functools.partial(loss, barrier=fusion_barrier)
    without = functools.partial(loss, barrier=lambda y: y)
    np.testing.assert_array_equal(fusion_barrier(x), x)
    np.testing.assert_array_equal(jax.grad(with_barrier)(x), jax.grad(without)(x))
    hvp = lambda f: jax.jvp(jax.grad(f), (x,), (v,))[1]  # forward-over-reverse, as grasp_scores
    np.testing.assert_allclose(hvp(with_barrier), hvp(without), rtol=1e-13)
    # The other branch (a NaN first element) is the identity too.
    nan_first = x.at[0, 0].set(jnp.nan)
    np.testing.assert_array_equal(fusion_barrier(nan_first), nan_first)
    with pytest.raises(ValueError, match="int32"):
        fusion_barrier(jnp.ones(3, jnp.int32))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks what XLA:CPU compiles")
def test_fusion_barrier_survives_xla_cpu():
    # XLA:CPU drops lax.optimization_barrier before fusion; the barrier's cond must stay, or the
    # kernel-gradient copies of a ResNet recompute its residual chain again.
    x = jnp.ones((4, 8))
    compiled = jax.jit(lambda x: fusion_barrier(jnp.exp(x)) + 1.0).lower(x).compile()
    assert "conditional" in compiled.as_text()
    compiled = jax.jit(lambda x: lax.optimization_barrier(jnp.exp(x)) + 1.0).lower(x).compile()
    assert "conditional" not in compiled.as_text()


def test_auto_mode_reads_its_input_through_a_barrier_on_cpu():
    x = jnp.zeros((2, 8, 8, 16))
    k = jnp.zeros((3, 3, 16, 4))

    def barrier_in(mode, platform):
        conv = functools.partial(
            conv_general_dilated,
            window_strides=(1, 1),
            padding="SAME",
            dimension_numbers=NHWC,
            mode=mode,
        )
        return has_barrier(exported_text(conv, x, k, platform=platform))

    assert barrier_in("auto", "cpu")
    assert not barrier_in("native", "cpu") and not barrier_in("fast", "cpu")
    assert not barrier_in("auto", "cuda") and not barrier_in("auto", "tpu")
    # Outside any trace the choice is made at once, for the device the call runs on.
    assert ("cond[" in str(jax.make_jaxpr(lambda: conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=NHWC, mode="auto"))())) == (
            jax.default_backend() == "cpu")


def test_the_barrier_stays_a_cond_under_vmap_over_the_images():
    # GraSP's scoring vmaps the model over its chunks: a predicate read from the batched
    # images would turn the cond into a select (no barrier); the kernel is not batched.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 3, 8, 8, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 16, 4)), jnp.float32)
    conv = functools.partial(conv_general_dilated, window_strides=(1, 1), padding="SAME",
                             dimension_numbers=NHWC, mode="auto")
    on_cpu = exported_text(jax.vmap(conv, in_axes=(0, None)), x, k, platform="cpu")
    assert has_barrier(on_cpu)
    batched_kernel = jnp.stack([k, k])
    on_cpu = exported_text(jax.vmap(conv), x, batched_kernel, platform="cpu")
    assert not has_barrier(on_cpu)  # where the kernel is batched too, the barrier is a select
    native = functools.partial(conv, mode="native")
    np.testing.assert_array_equal(jax.vmap(conv, in_axes=(0, None))(x, k),
                                  jax.vmap(native, in_axes=(0, None))(x, k))
    # A NaN where the predicate is read takes the other branch, still the identity.
    nan_kernel = k.at[0, 0, 0, 0].set(jnp.nan)
    np.testing.assert_array_equal(fusion_barrier(x, nan_kernel), x)
