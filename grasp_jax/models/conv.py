"""A drop-in ``conv_general_dilated`` that avoids XLA:CPU's slow convolutions.

XLA:CPU runs some convolutions far below the machine's matmul speed.  The
worst case is a window larger than the input it slides over: a 3x3 conv
512->512 on a 2x2 feature map (VGG19's last four convs on CIFAR) at batch 64
takes 0.5-1.6 s forward and 1-3 s for ``value_and_grad`` (1-2 GFLOP/s), while
the same layer on a 4x4 map takes ~40 ms.  Written as one matmul it takes
~12 ms forward and ~45 ms for ``value_and_grad``.  ``python -m
benchmarks.conv`` prints the measured table.

The patches formulation.  For a channels-last input ``x`` of shape
``(N, H, W, C)``, kernel ``k`` of shape ``(KH, KW, C, O)``, zero padding
``(lo, hi)`` per spatial dim, stride ``s`` and kernel dilation ``r``::

    out[n,h,w,o] = Σ_{i,j,c} x_pad[n, s_h h + r_h i, s_w w + r_w j, c] k[i,j,c,o]
                 = Σ_{t,c} P[n,h,w,t,c] K[t,c,o]
    P[n,h,w,t,c] = x_pad[n, s_h h + r_h i_t, s_w w + r_w j_t, c]   (t = tap (i_t, j_t))
    K[t,c,o]     = k[i_t, j_t, c, o]

i.e. one matmul ``(N·Ho·Wo, T·C) @ (T·C, O)``.  Each column block ``P[..., t, :]``
is a (strided) slice of the unpadded input, zero-padded to the output's
shape where the tap reads padding; taps that read nothing but padding (at a
1x1 map only the centre tap of a 3x3 kernel survives) are dropped at trace
time.  Input dilation is materialised with ``lax.pad``'s interior padding,
feature groups become a batch dimension of the matmul, and any layout in
``dimension_numbers`` is transposed to channels-last and back.

Everything is plain ``lax`` slicing, padding and ``dot_general``, so
``jax.grad``, forward-over-reverse Hessian-vector products
(``jax.jvp(jax.grad(f), ...)``, as ``grasp_scores`` uses), ``vmap`` and
higher derivatives all come from JAX's own rules, with no ``custom_vjp`` (whose
backward pass cannot be differentiated forward-mode).  Those rules keep it
fast: the backward pass is again one matmul per operand, ``dK = Pᵀ @ dout``
and ``dP = dout @ Kᵀ``, with ``dP`` scattered back to ``dx`` as a sum of
shifted slices.  (A sum of one matmul per tap reads fewer zeros and runs the
forward pass ~2x faster at 2x2, but XLA:CPU then re-computes the per-tap sums
inside every per-tap consumer of the backward pass: measured 1.3-2x slower
``value_and_grad`` over a stack of such layers and up to 5x slower HVPs.)

Which path runs.  ``mode='native'`` always calls ``lax.conv_general_dilated``;
``mode='fast'`` uses the patches formulation wherever it supports the call;
``mode='auto'`` uses it only where it was measured to win: on the CPU
backend, where :func:`fast_path_wins` holds.  For 1x1 kernels that fit their
input, what wins is only the derivatives (XLA:CPU's kernel gradient of a 1x1
conv is slow, its forward is as fast as a matmul or faster), so auto mode
computes the value natively and every derivative from the patches
formulation: a ``jax.custom_jvp`` whose tangent is the patches conv of the
tangents, linear in them, so ``grad`` transposes it to matmuls and
forward-over-reverse HVPs differentiate plain ``lax`` ops again.  On the CPU backend auto
mode also reads every input through :func:`grasp_jax.models.barrier.fusion_barrier` (an
identity XLA cannot fuse through), which stops XLA:CPU recomputing a ResNet's residual chain
inside each kernel gradient's layout copy (ResNet-32's training gradient: 1.9x faster).
``mode=None`` (the default) reads
the environment variable ``GRASP_JAX_FAST_CONV`` (``0``/``native``,
``1``/``fast``, ``auto``; unset means ``auto``).  The choice is made when a
function is traced, so set the variable before the first ``jax.jit`` call (a
jitted function keeps the path it was traced with).

Use with Flax::

    nn.Conv(features, (3, 3), conv_general_dilated=conv_general_dilated)
    nn.Conv(..., conv_general_dilated=functools.partial(conv_general_dilated,
                                                        mode='fast'))
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from grasp_jax.models.barrier import fusion_barrier

__all__ = [
    "FAST_CONV_ENV",
    "MIN_FAST_IN_FEATURES",
    "Mode",
    "conv_general_dilated",
    "fast_path_wins",
    "resolve_mode",
    "uses_fast_path",
]

Mode = Literal["auto", "fast", "native"]

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
            raise ValueError(f"{FAST_CONV_ENV}={raw!r}; expected one of 0, 1, auto") from None
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


def _dilate(size: int, dilation: int) -> int:
    """Size of an axis of ``size`` elements with ``dilation - 1`` zeros between."""
    return 0 if size == 0 else (size - 1) * dilation + 1


class _Plan:
    """Static description of a convolution the patches formulation computes.

    Attributes:
      lhs_perm: transposes the input to channels-last ``(N, *spatial, C)``.
      rhs_perm: transposes the kernel to ``(*spatial, I, O)``.
      out_perm: transposes ``(N, *spatial, O)`` to the requested output layout.
      kernel: kernel spatial sizes.
      strides, lhs_dilation, rhs_dilation: per spatial dim.
      in_spatial: input spatial sizes after lhs dilation.
      window: kernel window sizes after rhs dilation.
      pads: explicit ``(lo, hi)`` padding per spatial dim.
      out_spatial: output spatial sizes.
      in_channels, in_features, out_features: input channels, kernel input
        channels (per group) and kernel output channels.
    """

    def __init__(
        self,
        lhs_shape: Sequence[int],
        rhs_shape: Sequence[int],
        window_strides: Sequence[int],
        padding: Any,
        lhs_dilation: Sequence[int],
        rhs_dilation: Sequence[int],
        dimension_numbers: Any,
    ):
        lhs_spec, rhs_spec, out_spec = lax.conv_dimension_numbers(
            tuple(lhs_shape), tuple(rhs_shape), dimension_numbers
        )
        self.lhs_perm = (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
        self.rhs_perm = (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
        # Our result has axes (batch, *spatial, feature); output axis q of the
        # requested layout is our axis a with out_target[a] == q.
        out_target = (out_spec[0], *out_spec[2:], out_spec[1])
        self.out_perm = tuple(int(a) for a in np.argsort(out_target))
        self.in_channels = lhs_shape[lhs_spec[1]]
        self.in_features = rhs_shape[rhs_spec[1]]
        self.out_features = rhs_shape[rhs_spec[0]]
        self.kernel = tuple(rhs_shape[d] for d in rhs_spec[2:])
        self.strides = tuple(window_strides)
        self.lhs_dilation = tuple(lhs_dilation)
        self.rhs_dilation = tuple(rhs_dilation)
        self.in_spatial = tuple(
            _dilate(lhs_shape[d], l) for d, l in zip(lhs_spec[2:], lhs_dilation)
        )
        self.window = tuple(_dilate(k, r) for k, r in zip(self.kernel, rhs_dilation))
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(self.in_spatial, self.window, self.strides, padding)
        self.pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        self.out_spatial = tuple(
            max(0, (n + lo + hi - k) // s + 1)
            for n, (lo, hi), k, s in zip(self.in_spatial, self.pads, self.window, self.strides)
        )

    def tap_range(self, dim: int, tap: int) -> tuple[int, int, int] | None:
        """Where kernel tap ``tap`` along ``dim`` meets real input.

        Output index ``h`` reads padded index ``s h + r tap``, i.e. input index
        ``m = s h + r tap - lo``.  Returns ``(h0, h1, m0)``: outputs
        ``h0 <= h < h1`` read inputs ``m0, m0 + s, ...``; None if the tap reads
        only padding.
        """
        s, r = self.strides[dim], self.rhs_dilation[dim]
        lo = self.pads[dim][0]
        n, n_out = self.in_spatial[dim], self.out_spatial[dim]
        offset = r * tap - lo  # m = s h + offset
        h0 = max(0, _ceil_div(-offset, s))  # first h with m >= 0
        h1 = min(n_out, _ceil_div(n - offset, s))  # first h with m >= n
        if h0 >= h1:
            return None
        return h0, h1, s * h0 + offset


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(x.shape), np.dtype(x.dtype)
    x = np.asarray(x)
    return x.shape, x.dtype


def _plan_or_none(
    lhs: Any,
    rhs: Any,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None,
    dimension_numbers: Any,
    feature_group_count: int,
    batch_group_count: int,
) -> _Plan | None:
    """A plan if the patches formulation computes this call exactly, else None.

    Anything unusual (batch groups, integer or mismatched dtypes, inconsistent
    shapes, string padding with lhs dilation, empty arrays) goes to
    ``lax.conv_general_dilated``, which also raises lax's own errors for
    invalid calls.
    """
    lhs_shape, lhs_dtype = _shape_dtype(lhs)
    rhs_shape, rhs_dtype = _shape_dtype(rhs)
    nsp = len(lhs_shape) - 2
    if nsp < 1 or len(rhs_shape) != len(lhs_shape):
        return None
    if batch_group_count != 1 or feature_group_count < 1:
        return None
    if lhs_dtype != rhs_dtype or not jnp.issubdtype(lhs_dtype, jnp.inexact):
        return None
    lhs_dilation = (1,) * nsp if lhs_dilation is None else tuple(lhs_dilation)
    rhs_dilation = (1,) * nsp if rhs_dilation is None else tuple(rhs_dilation)
    if not len(window_strides) == len(lhs_dilation) == len(rhs_dilation) == nsp:
        return None
    if min((*window_strides, *lhs_dilation, *rhs_dilation)) < 1:
        return None
    if isinstance(padding, str) and any(d != 1 for d in lhs_dilation):
        return None  # lax raises for this
    if not isinstance(padding, str) and len(padding) != nsp:
        return None
    try:
        plan = _Plan(
            lhs_shape,
            rhs_shape,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
        )
    except (TypeError, ValueError):
        return None
    g = feature_group_count
    if plan.in_channels != plan.in_features * g or plan.out_features % g:
        return None
    if 0 in lhs_shape or 0 in rhs_shape or 0 in plan.out_spatial:
        return None
    return plan


def _pointwise(plan: _Plan) -> bool:
    """A 1x1 window: XLA:CPU's forward is fine, its kernel gradient is not."""
    return all(k == 1 for k in plan.window)


def _choose(
    lhs: Any,
    rhs: Any,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None,
    dimension_numbers: Any,
    feature_group_count: int,
    batch_group_count: int,
    mode: str | None,
) -> tuple[_Plan | None, bool]:
    """``(plan, derivatives_only)``: the plan to run the patches formulation with, or
    None for native; ``derivatives_only`` when the value stays native and only the
    derivatives use it (auto mode's 1x1 kernels, see
    :func:`_native_value_fast_derivatives`)."""
    mode = resolve_mode(mode)
    if mode == "native":
        return None, False
    plan = _plan_or_none(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
    )
    if plan is None or mode == "fast":
        return plan, False
    # On GPU/TPU the native convolutions (cuDNN etc.) are the fast ones.
    if jax.default_backend() != "cpu":
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
) -> bool:
    """Whether :func:`conv_general_dilated` takes the patches formulation (for the
    derivatives at least: auto mode computes 1x1 values natively).

    Same arguments as :func:`conv_general_dilated`; ``lhs`` and ``rhs`` may be
    arrays or anything with ``shape`` and ``dtype`` (``jax.ShapeDtypeStruct``).
    """
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
            mode,
        )[0]
        is not None
    )


def _wants_barrier(lhs: Any, mode: str | None) -> bool:
    """Auto mode on XLA:CPU reads each float input through :func:`fusion_barrier`, so that
    the kernel gradient's layout copy reads it instead of recomputing a residual chain."""
    if resolve_mode(mode) != "auto" or jax.default_backend() != "cpu":
        return False
    shape, dtype = _shape_dtype(lhs)
    return jnp.issubdtype(dtype, jnp.inexact) and 0 not in shape


def _conv_patches(
    lhs: jax.Array,
    rhs: jax.Array,
    plan: _Plan,
    feature_group_count: int,
    precision: Any,
    preferred_element_type: Any,
) -> jax.Array:
    """The patches formulation; see the module docstring for the math."""
    nsp = len(plan.in_spatial)
    x = (
        lhs if plan.lhs_perm == tuple(range(lhs.ndim)) else jnp.transpose(lhs, plan.lhs_perm)
    )  # (N, *S, C)
    k = (
        rhs if plan.rhs_perm == tuple(range(rhs.ndim)) else jnp.transpose(rhs, plan.rhs_perm)
    )  # (*K, Cg, O)
    if any(d != 1 for d in plan.lhs_dilation):
        # Input dilation inserts zeros between input elements; materialising
        # them keeps the tap arithmetic unchanged (transposed convs are rare).
        x = lax.pad(
            x,
            jnp.zeros((), x.dtype),
            [(0, 0, 0)] + [(0, 0, d - 1) for d in plan.lhs_dilation] + [(0, 0, 0)],
        )
    g = feature_group_count
    out_dtype = jnp.dtype(preferred_element_type) if preferred_element_type is not None else x.dtype
    # Sub-float32 inputs: accumulate in float32 and round once at the end, as
    # the native convolution does.
    acc_dtype = out_dtype
    if jnp.issubdtype(out_dtype, jnp.floating) and jnp.finfo(out_dtype).bits < 32:
        acc_dtype = jnp.dtype(jnp.float32)
    # Feature groups become a batch dimension of the matmul (size 1 without
    # groups, which XLA folds away).
    x = x.reshape(*x.shape[:-1], g, x.shape[-1] // g)  # (N, *S, G, Cg)
    k = k.reshape(*k.shape[:-1], g, k.shape[-1] // g)  # (*K, Cg, G, Og)

    # Live taps: those reading at least one real input element.  Each tap is
    # a tuple over spatial dims of (kernel index, (h0, h1, m0)).
    per_dim = [
        [(t, r) for t in range(plan.kernel[d]) if (r := plan.tap_range(d, t)) is not None]
        for d in range(nsp)
    ]
    taps = list(itertools.product(*per_dim))
    if not taps:
        # Every output reads only padding, so it is identically zero (and so are
        # its derivatives, which JAX gets from the unused operands).
        out = jnp.zeros((x.shape[0], *plan.out_spatial, g * k.shape[-1]), out_dtype)
    else:
        zero = jnp.zeros((), x.dtype)
        columns = []
        for tap in taps:
            # P[:, h, ...] = x[:, s h + r i - lo, ...] on the outputs [h0, h1) that
            # see real input, zero elsewhere: a strided slice padded to Ho.
            start, limit, stride = [0] * x.ndim, list(x.shape), [1] * x.ndim
            out_pad = [(0, 0, 0)] * x.ndim
            for d, (_, (h0, h1, m0)) in enumerate(tap):
                s = plan.strides[d]
                start[1 + d], stride[1 + d] = m0, s
                limit[1 + d] = m0 + s * (h1 - h0 - 1) + 1
                out_pad[1 + d] = (h0, plan.out_spatial[d] - h1, 0)
            col = lax.slice(x, start, limit, stride)
            if any(p != (0, 0, 0) for p in out_pad):
                col = lax.pad(col, zero, out_pad)
            columns.append(col)
        patches = jnp.stack(columns, axis=-2)  # (N, *S', G, T, Cg)
        kernel = jnp.stack([k[tuple(t for t, _ in tap)] for tap in taps])
        kernel = jnp.moveaxis(kernel, 2, 0)  # (G, T, Cg, Og)
        # Contract (T, Cg), batch over G: (G, N, *S', Og).
        dims = (((nsp + 2, nsp + 3), (1, 2)), ((nsp + 1,), (0,)))
        out = lax.dot_general(
            patches, kernel, dims, precision=precision, preferred_element_type=acc_dtype
        )
        out = jnp.moveaxis(out, 0, -2)  # (N, *S', G, Og)
        out = out.reshape(*out.shape[:-2], g * k.shape[-1]).astype(out_dtype)
    if plan.out_perm != tuple(range(out.ndim)):
        out = jnp.transpose(out, plan.out_perm)
    return out


def _native_value_fast_derivatives(native, patches, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """``native(lhs, rhs)`` whose derivatives are those of ``patches`` (the same function).

    The JVP is ``(native(x, k), patches(dx, k) + patches(x, dk))``: the tangent is
    linear in (dx, dk), so reverse mode transposes it to the patches' matmuls,
    and a second derivative differentiates plain ``lax`` ops. Symbolic-zero
    tangents (the data input, frozen weights) are skipped, not multiplied.
    """

    @jax.custom_jvp
    def conv(x, k):
        return native(x, k)

    def conv_jvp(primals, tangents):
        x, k = primals
        dx, dk = tangents
        out = conv(x, k)
        parts = []
        if not isinstance(dx, SymbolicZero):
            parts.append(patches(dx, k))
        if not isinstance(dk, SymbolicZero):
            parts.append(patches(x, dk))
        if not parts:
            return out, jnp.zeros_like(out)
        return out, parts[0] if len(parts) == 1 else parts[0] + parts[1]

    conv.defjvp(conv_jvp, symbolic_zeros=True)
    return conv(lhs, rhs)


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
    if _wants_barrier(lhs, mode):
        lhs = fusion_barrier(lhs)
    plan, derivatives_only = _choose(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
        mode,
    )

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

    if plan is None:
        return native(lhs, rhs)

    def patches(x, k):
        return _conv_patches(x, k, plan, feature_group_count, precision, preferred_element_type)

    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    if derivatives_only:
        return _native_value_fast_derivatives(native, patches, lhs, rhs)
    return patches(lhs, rhs)
