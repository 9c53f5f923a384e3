"""A drop-in ``conv_general_dilated`` that avoids XLA:CPU's slow convolutions.

XLA:CPU runs some convolutions far below the machine's matmul speed.  The
worst case is a window larger than the input it slides over: a 3x3 conv
512->512 on a 2x2 feature map (VGG19's last four convs on CIFAR) at batch 64
takes 0.5-1.6 s forward and 1-3 s for ``value_and_grad`` (1-2 GFLOP/s), while
the same layer on a 4x4 map takes ~40 ms.  Written as one matmul it takes
~12 ms forward and ~45 ms for ``value_and_grad``.  ``python -m
benchmarks.conv`` prints the measured table.

The patches formulation (one matmul of input patches by the flattened
kernel) is in :mod:`grasp_jax.models.patches`, with its math.

Which path runs.  ``mode='native'`` always calls ``lax.conv_general_dilated``;
``mode='fast'`` uses the patches formulation wherever it supports the call;
``mode='auto'`` uses it only where it was measured to win: in a program run on
the CPU, where :func:`fast_path_wins` holds.  For 1x1 kernels that fit their
input, what wins is only the derivatives (XLA:CPU's kernel gradient of a 1x1
conv is slow, its forward is as fast as a matmul or faster), so auto mode
computes the value natively and every derivative from the patches
formulation: a ``jax.custom_jvp`` whose tangent is the patches conv of the
tangents, linear in them, so ``grad`` transposes it to matmuls and
forward-over-reverse HVPs differentiate plain ``lax`` ops again.  On the CPU auto
mode also reads every input through :func:`grasp_jax.models.barrier.fusion_barrier` (an
identity XLA cannot fuse through), which stops XLA:CPU recomputing a ResNet's residual chain
inside each kernel gradient's layout copy (ResNet-32's training gradient: 1.9x faster).

Which platform.  Auto mode stages both choices with ``lax.platform_dependent`` (the
CPU's barrier and patches; XLA's own convolution everywhere else), and the platform a
program is *lowered for* picks one: the branch not taken never reaches XLA.  So a program
traced on a CPU host and exported for ``cuda`` or ``tpu`` (``jax.export``) holds only
native convolutions, and the same jitted function runs the fast path on CPU devices and
cuDNN on GPUs.  (Called outside any trace, the choice is made at once for the device the
call runs on, and only that branch is traced.)  Staged at every convolution, the choice
costs trace and compile time under differentiation; a program traced once per platform
(:func:`grasp_jax.platforms.per_platform`, as the scoring programs and the runner's steps
are) makes it a plain Python choice instead.  ``python -m benchmarks.lowering`` prints
both costs.

``mode=None`` (the default) reads
the environment variable ``GRASP_JAX_FAST_CONV`` (``0``/``native``,
``1``/``fast``, ``auto``; unset means ``auto``); ``0`` and ``1`` force their path on every
platform.  The mode is read when a
function is traced, so set the variable before the first ``jax.jit`` call (a
jitted function keeps the path it was traced with).

Use with Flax::

    nn.Conv(features, (3, 3), conv_general_dilated=conv_general_dilated)
    nn.Conv(..., conv_general_dilated=functools.partial(conv_general_dilated,
                                                        mode='fast'))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

from grasp_jax.models.barrier import fusion_barrier
from grasp_jax.models.patches import (
    Plan,
    conv_patches,
    native_value_fast_derivatives,
    plan_or_none,
    shape_dtype,
)
from grasp_jax.platforms import traced_platform

__all__ = [
    "FAST_CONV_ENV",
    "MIN_FAST_IN_FEATURES",
    "PATCHES_SCOPE",
    "Mode",
    "conv_general_dilated",
    "fast_path_wins",
    "resolve_mode",
    "uses_fast_path",
]

Mode = Literal["auto", "fast", "native"]

#: The ``jax.named_scope`` of the patches formulation's ops: a lowered module's locations
#: name it wherever the fast path is in the program.
PATCHES_SCOPE = "patches_conv"

#: Environment variable read when ``mode=None``: ``0``, ``1`` or ``auto``.
FAST_CONV_ENV = "GRASP_JAX_FAST_CONV"

_ENV_VALUES: dict[str, Mode] = {
    "": "auto",
    "auto": "auto",
    "1": "fast",
    "fast": "fast",
    "on": "fast",
    "true": "fast",
    "0": "native",
    "native": "native",
    "off": "native",
    "false": "native",
}


def resolve_mode(mode: str | None = None) -> Mode:
    """Returns the effective mode: ``mode`` if given, else ``$GRASP_JAX_FAST_CONV``.

    Raises:
      ValueError: naming the bad value, if it is not one of the accepted names.
    """
    if mode is None:
        raw = os.environ.get(FAST_CONV_ENV, "auto")
        try:
            return _ENV_VALUES[raw.strip().lower()]
        except KeyError:
            raise ValueError(f"environment variable {FAST_CONV_ENV}={raw!r} is not one of "
                             f"{', '.join(v for v in _ENV_VALUES if v)} (or unset)") from None
    if mode not in ("auto", "fast", "native"):
        raise ValueError(f"mode={mode!r}; expected 'auto', 'fast', 'native' or None")
    return mode  # type: ignore[return-value]


#: Below this many input channels (per group) XLA:CPU's own convolution was
#: as fast or faster in every shape measured; the matmul is too thin to win.
MIN_FAST_IN_FEATURES = 16


def fast_path_wins(
    input_spatial: Sequence[int], window_spatial: Sequence[int], in_features: int
) -> bool:
    """The measured XLA:CPU rule: True where the patches formulation is faster.

    Args:
      input_spatial: spatial sizes of the input (after lhs dilation).
      window_spatial: spatial sizes of the kernel window (after rhs dilation).
      in_features: input channels per feature group.

    The rule: ``in_features >= 16`` and either the window is larger than the
    input in some spatial dim, or the kernel is pointwise (1x1).  Measured with
    ``python -m benchmarks.conv --sweep`` / ``--resnet`` at batch 64 and 128
    (sizes 1..32, channels 3..512, strides 1 and 2), judged by
    ``value_and_grad`` time as training runs it:

    * window > input (3x3 at 1x1 and 2x2 maps): XLA:CPU's convolution runs at
      1-2 GFLOP/s, e.g. 3x3 512->512 at 2x2, batch 64: 1000-1800 ms native vs
      40-47 ms fast; the patches win 2.5-76x at 16..512 channels (and 5x5
      kernels at 2x2-4x4 maps behave the same).
    * window <= input (3x3 at 3x3 and larger, strided 3x3): native is about as
      fast (0.7-1.2x) or up to 6x faster (the patches copy the input 9 times),
      so keep it.
    * 1x1 kernels, strided or not: one plain matmul vs XLA's convolution, whose
      kernel gradient is slow; the matmul wins 1.2-5x (e.g. 1x1 256->64 at
      16x16: 55 vs 12 ms).
    * 3 input channels: native wins or ties everywhere (within 0.1 ms at tiny
      maps, up to 3x at 32x32 1x1), hence the channel floor.
    """
    if in_features < MIN_FAST_IN_FEATURES:
        return False
    pointwise = all(k == 1 for k in window_spatial)
    larger = any(k > n for n, k in zip(input_spatial, window_spatial, strict=True))
    return pointwise or larger


def _pointwise(plan: Plan) -> bool:
    """A 1x1 window: XLA:CPU's forward is fine, its kernel gradient is not."""
    return all(k == 1 for k in plan.window)


def _choose(*conv_args: Any, mode: str | None, platform: str) -> tuple[Plan | None, bool]:
    """``(plan, derivatives_only)`` on ``platform``: the plan to run the patches formulation
    with, or None for native; ``derivatives_only`` when the value stays native and only the
    derivatives use it (auto mode's 1x1 kernels, see :func:`native_value_fast_derivatives`)."""
    mode = resolve_mode(mode)
    if mode == "native":
        return None, False
    plan = plan_or_none(*conv_args)  # the arguments of lax.conv_general_dilated, in order
    if plan is None or mode == "fast":
        return plan, False
    # On GPU/TPU the native convolutions (cuDNN etc.) are the fast ones.
    if platform != "cpu":
        return None, False
    if not fast_path_wins(plan.in_spatial, plan.window, plan.in_features):
        return None, False
    return plan, _pointwise(plan)


def uses_fast_path(
    lhs: Any,
    rhs: Any,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    *,
    mode: str | None = None,
    platform: str | None = None,
) -> bool:
    """Whether :func:`conv_general_dilated` takes the patches formulation (for the
    derivatives at least: auto mode computes 1x1 values natively) in a program run on
    ``platform`` (``'cpu'``, ``'cuda'``, ``'rocm'``, ``'tpu'``; default: JAX's default
    backend, where an ordinary ``jax.jit`` call runs).

    Same arguments as :func:`conv_general_dilated`; ``lhs`` and ``rhs`` may be
    arrays or anything with ``shape`` and ``dtype`` (``jax.ShapeDtypeStruct``).
    """
    platform = jax.default_backend() if platform is None else platform
    return (
        _choose(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            batch_group_count,
            mode=mode,
            platform=platform,
        )[0]
        is not None
    )


def _wants_barrier(lhs: Any, mode: Mode) -> bool:
    """Auto mode on XLA:CPU reads each float input through :func:`fusion_barrier`, so that
    the kernel gradient's layout copy reads it instead of recomputing a residual chain."""
    if mode != "auto":
        return False
    shape, dtype = shape_dtype(lhs)
    return jnp.issubdtype(dtype, jnp.inexact) and 0 not in shape


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    mode: str | None = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` with a faster path where XLA:CPU is slow.

    Same arguments and result as :func:`jax.lax.conv_general_dilated`
    (any layout in ``dimension_numbers``, string or explicit padding, strides,
    both dilations, feature groups), so it can be passed as
    ``flax.linen.Conv(conv_general_dilated=...)``.  Computes

        out[n,h,w,o] = Σ_{i,j,c} x_pad[n, s_h h + r_h i, s_w w + r_w j, c] k[i,j,c,o]

    either natively or as one matmul of input patches by the flattened kernel
    (module docstring), as ``mode`` and the shapes decide.

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count, precision,
      preferred_element_type: as for ``lax.conv_general_dilated``.
      mode: ``'auto'`` (patches formulation where :func:`uses_fast_path` says it
        wins), ``'fast'`` (wherever supported), ``'native'`` (never), or None to
        read ``$GRASP_JAX_FAST_CONV``.  Calls the patches formulation does not
        support (``batch_group_count > 1``, integer dtypes, ...) always run
        natively.

    Returns:
      The convolution, identical in shape, dtype and (up to float rounding)
      value to ``lax.conv_general_dilated``.
    """
    mode = resolve_mode(mode)
    conv_args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                 dimension_numbers, feature_group_count, batch_group_count)

    def native(x, k):
        return lax.conv_general_dilated(
            x,
            k,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )

    def with_plan(plan, derivatives_only):
        """The convolution as ``plan`` says: native (None), patches, or native values with
        patches derivatives."""

        def conv(x, k):
            if plan is None:
                return native(x, k)

            def patches(x, k):
                with jax.named_scope(PATCHES_SCOPE):
                    return conv_patches(x, k, plan, feature_group_count, precision,
                                        preferred_element_type)

            if derivatives_only:
                return native_value_fast_derivatives(native, patches, x, k)
            return patches(x, k)

        return conv

    if mode != "auto":  # forced: the same program on every platform
        plan, _ = _choose(*conv_args, mode=mode, platform="cpu")
        lhs, rhs = (jnp.asarray(lhs), jnp.asarray(rhs)) if plan is not None else (lhs, rhs)
        return with_plan(plan, False)(lhs, rhs)
    if not _wants_barrier(lhs, mode):
        return native(lhs, rhs)
    cpu_conv = with_plan(*_choose(*conv_args, mode=mode, platform="cpu"))

    def on_cpu(x, k):
        return cpu_conv(fusion_barrier(x, k), k)

    traced_for = traced_platform()
    if traced_for is not None:  # inside a program traced once per platform: a plain choice
        return on_cpu(lhs, rhs) if traced_for == "cpu" else native(lhs, rhs)
    # The platform the program is lowered for picks the branch (XLA never sees the other):
    # a program exported for cuda or tpu from a CPU host holds only the native convolution.
    return lax.platform_dependent(jnp.asarray(lhs), jnp.asarray(rhs), cpu=on_cpu, default=native)
