"""N:M structured masks from any scores: keep N of every M consecutive weights.

Sparse tensor cores (NVIDIA Ampere and later, 2:4) skip the zeros of a
matrix product when every group of four consecutive weights along the
*reduction* dimension holds at most two non-zeros. For Flax's kernel layouts
the reduction dimension is the input-feature axis, ``axis=-2``:

- Dense ``(in, out)``: the groups run down each output column, over ``in``.
- Conv ``(kh, kw, in, out)``: the groups run over the input channels, for
  each spatial tap and output channel (as NVIDIA's ASP does for convs).

Layouts with the input axis elsewhere pass it: ``axis=-1`` for PyTorch-style
``(out, in)`` weights (Equinox ``Linear``), ``axis=1`` for ``(out, in, kh, kw)``.

When that axis' length L is not a multiple of M, the last group of each row
has r = L mod M weights and keeps min(N, r) of them: it is treated as a full
group whose M - r missing weights are zeros already, which the hardware
layout (padding to a multiple of M) would hold anyway. So a conv with 3 input
channels keeps 2 of its 3 under 2:4, and every padded group holds at most N
non-zeros.

Within a group the direction is that of :func:`grasp_jax.masks_from_scores`
(``direction="lowest"`` keeps the N highest scores); equal scores are pruned in
order of position, the earlier first, and a :class:`~grasp_jax.TieWarning`
says so when that choice removes at least 1% of the removed weights. Weights
already pruned by ``masks`` stay pruned and count towards the group's M - N.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax.criteria import Direction, direction_keyword, resolve_direction
from grasp_jax.masks import (
    TIE_WARN_FRACTION,
    TieWarning,
    check_mask_dtypes,
    check_same_structure,
)
from grasp_jax.prunable import PrunableSpec, check_leaf_dtypes, path_name, prunable_flags
from grasp_jax.scoring import check_finite
from grasp_jax.selection import removal_key

PyTree = Any

__all__ = ["nm_masks"]


@functools.partial(jax.jit, static_argnames=("n", "m", "axis", "highest"))
def _nm_keep(scores, forced, *, n: int, m: int, axis: int, highest: bool) -> jax.Array:
    key = removal_key(scores, highest=highest)
    top = jnp.asarray(jnp.iinfo(key.dtype).max, key.dtype)
    # Already-pruned weights go first; the padding of a short last group
    # (same key, later position) is removed after them.
    key = jnp.moveaxis(jnp.where(forced, top, key), axis, -1)
    length = key.shape[-1]
    pad = (-length) % m
    key = jnp.pad(key, [(0, 0)] * (key.ndim - 1) + [(0, pad)], constant_values=top)
    groups = key.reshape(key.shape[:-1] + (-1, m))
    # Order each group from the first to go to the last: largest key first,
    # equal keys by position (a stable sort of the reversed keys).
    order = jnp.argsort(~groups, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)  # each weight's place in that order
    keep = (rank >= m - n).reshape(key.shape)[..., :length]
    # Where the last weight removed and the first kept have equal scores,
    # position chose among them: count the removed weights of that tie.
    ordered = jnp.take_along_axis(groups, order, axis=-1)
    last_removed = ordered[..., m - n - 1 : m - n]
    tied = (ordered[..., m - n : m - n + 1] == last_removed) & (last_removed != top)
    by_position = jnp.sum((ordered[..., : m - n] == last_removed) & tied)
    removed = jnp.sum(~keep[..., :length])
    return jnp.moveaxis(keep, -1, axis) & ~forced, by_position, removed


def nm_masks(
    scores: PyTree,
    n: int,
    m: int,
    *,
    direction: Direction | None = None,
    criterion: str | None = None,
    axis: int = -2,
    prunable: PrunableSpec = None,
    masks: PyTree | None = None,
    prune: Direction | None = None,
) -> PyTree:
    """Keep-masks keeping ``n`` of every ``m`` consecutive weights along ``axis`` of each
    prunable leaf (2:4 for sparse tensor cores); non-prunable leaves stay whole.

    Args:
      scores: a pytree like params (from any ``*_scores`` function).
      n, m: keep ``n`` of each group of ``m``, 0 < n < m; the sparsity is
        1 - n/m exactly when every leaf's ``axis`` length is a multiple of m.
      direction, criterion: the direction, as in :func:`grasp_jax.masks_from_scores`.
      axis: the axis along which groups run, for every prunable leaf; -2 is
        the input axis of Flax Dense and Conv kernels (see the module docstring).
      prunable: which leaves are prunable (default: ``kernel`` with ndim >= 2).
      masks: optional current masks whose pruned weights stay pruned.
      prune: the name of ``direction`` before 0.3; deprecated, it warns.
    """
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if not 0 < n < m:
        raise ValueError(f"N:M masks need 0 < n < m, got n={n}, m={m}")
    direction = direction_keyword(direction, prune)
    highest = resolve_direction(direction, criterion) == "highest"
    flags = prunable_flags(scores, prunable)
    check_leaf_dtypes(scores, flags, what="scores", integers=True)
    if masks is not None:
        check_same_structure(masks, scores, "masks", "scores")
        check_mask_dtypes(masks)
    check_finite(scores, prunable=prunable)
    named, treedef = jax.tree_util.tree_flatten_with_path(scores)
    old = jax.tree_util.tree_leaves(masks) if masks is not None else [None] * len(named)
    out, ties = [], []
    for (path, x), current, flag in zip(named, old, flags):
        if not flag:
            out.append(jnp.ones(np.shape(x), bool))
            continue
        if not -np.ndim(x) <= axis < np.ndim(x):
            raise ValueError(
                f"axis {axis} is out of range for {path_name(path)} of shape {np.shape(x)}"
            )
        forced = jnp.zeros(np.shape(x), bool) if current is None else ~jnp.asarray(current, bool)
        keep, by_position, removed = _nm_keep(jnp.asarray(x), forced, n=n, m=m,
                                              axis=axis % np.ndim(x), highest=highest)
        out.append(keep)
        ties.append((path_name(path), by_position, removed))
    _warn_ties(ties, f"{n}:{m}")
    return jax.tree_util.tree_unflatten(treedef, out)


def _warn_ties(ties: list[tuple[str, jax.Array, jax.Array]], structure: str) -> None:
    counts = jax.device_get([(t, r) for _, t, r in ties])  # one sync for all leaves
    by_position = sum(int(t) for t, _ in counts)
    removed = sum(int(r) for _, r in counts)
    if removed and by_position >= TIE_WARN_FRACTION * removed:
        where = ", ".join(f"{name} ({int(t):,})" for (name, _, _), (t, _) in zip(ties, counts) if t)
        warnings.warn(
            f"in the {structure} groups, position (equal scores) chose {by_position:,} of the "
            f"{removed:,} weights removed ({by_position / removed:.1%}); layers: {where}. The "
            "scores do not rank these weights (e.g. exact zeros behind a zero-initialized "
            "BatchNorm scale)",
            TieWarning,
            stacklevel=3,
        )
