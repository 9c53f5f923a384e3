"""Exact selection of the n most prunable entries of a flat score vector.

Sorting 138M scores (VGG16) is slow on CPU and memory hungry; instead the
threshold is found by bisection over the order-preserving unsigned-integer
image of the floats: 32 (or 64) passes that each count how many entries lie
above a candidate. Entries strictly beyond the threshold are removed; among
the entries *at* it (a tie) exactly as many as are still needed are removed,
chosen by a tie-break that is deterministic:

- ``"position"``: earlier flat positions first;
- ``"random"``: a uniformly random subset drawn from a PRNG key (again by
  bisection, over random 31-bit priorities, with position breaking the rare
  equal priorities), so a given key always gives the same mask.

Besides the mask, a selection says how large the tie at the threshold was and
how many of its entries the tie-break removed, so that callers can warn when
the tie-break, not the scores, decides a noticeable part of the mask.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

TieBreak = Literal["position", "random"]
TIE_BREAKS: tuple[str, ...] = ("position", "random")

__all__ = ["TIE_BREAKS", "Selection", "TieBreak", "removal_key", "select_removal"]


class Selection(NamedTuple):
    """The outcome of :func:`select_removal` (device arrays)."""

    keep: jax.Array  # bool, flat: False where removed
    tied: jax.Array  # int, one per segment: entries of that segment at the threshold score
    tied_removed: jax.Array  # int scalar: how many entries at the threshold were removed
    tie_value: jax.Array  # the threshold score itself (meaningful when tied_removed > 0)


def removal_key(scores: jax.Array, *, highest: bool) -> jax.Array:
    """A uint per entry: the larger it is, the sooner that entry is pruned.

    The float order of ``scores`` (-0.0 just below +0.0) mapped onto uint32
    (uint64 for float64), reversed when the lowest scores go first.
    """
    if scores.dtype == jnp.float64:
        itype, utype, bits = jnp.int64, jnp.uint64, 64
    else:
        scores = scores.astype(jnp.float32)
        itype, utype, bits = jnp.int32, jnp.uint32, 32
    i = jax.lax.bitcast_convert_type(scores, itype)
    u = jax.lax.bitcast_convert_type(i, utype)
    sign = jnp.asarray(1, utype) << (bits - 1)
    # Positive floats: set the sign bit (they sort above all negatives).
    # Negative floats: flip every bit (larger magnitude -> smaller key).
    key = jnp.where(i < 0, ~u, u | sign)
    return key if highest else ~key  # ~ reverses the order of unsigned ints


def _split_at_threshold(key: jax.Array, n: jax.Array):
    """(above, ties, n_ties_needed) for removing the ``n`` largest keys."""
    utype = key.dtype

    # Largest t with #{key >= t} >= n, by bisection on [0, max].
    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + ((hi - lo) >> 1) + ((hi - lo) & 1)
        enough = jnp.sum(key >= mid) >= n
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    top = jnp.asarray(jnp.iinfo(utype).max, utype)
    lo, _ = jax.lax.fori_loop(0, jnp.iinfo(utype).bits + 1, body, (jnp.asarray(0, utype), top))
    above = key > lo
    return above, key == lo, n - jnp.sum(above)


def _first(ties: jax.Array, n: jax.Array) -> jax.Array:
    """The first ``n`` set entries of ``ties`` in flat order."""
    rank = jnp.cumsum(ties.astype(jnp.int32 if ties.size < 2**31 else jnp.int64))
    return ties & (rank <= n)


@functools.partial(jax.jit, static_argnames=("highest", "random_ties"))
def _select(scores, forced, n_remove, segment_ends, tie_key, *, highest: bool, random_ties: bool):
    key = removal_key(scores, highest=highest)
    # Forced entries (already pruned) get the largest key, which no score maps
    # to (NaN is rejected earlier, inf's image is below it): removed first.
    key = jnp.where(forced, jnp.asarray(jnp.iinfo(key.dtype).max, key.dtype), key)
    above, ties, n_ties = _split_at_threshold(key, n_remove)
    if random_ties:
        priority = jax.random.bits(tie_key, key.shape, jnp.uint32)
        priority = jnp.where(ties, (priority >> 1) + 1, 0)  # ties in [1, 2^31], others 0
        r_above, r_ties, r_n = _split_at_threshold(priority, n_ties)
        chosen = r_above | _first(r_ties, r_n)
    else:
        chosen = _first(ties, n_ties)
    tied_so_far = jnp.cumsum(ties.astype(jnp.int32 if ties.size < 2**31 else jnp.int64))
    tied = jnp.diff(tied_so_far[segment_ends - 1], prepend=0)
    tie_value = jnp.max(jnp.where(ties & ~forced, scores, -jnp.inf))
    return Selection(~(above | chosen), tied, n_ties, tie_value)


def select_removal(
    scores: jax.Array,
    n_remove: int,
    *,
    highest: bool,
    forced: jax.Array | None = None,
    segment_sizes: tuple[int, ...] | None = None,
    tie_break: TieBreak = "position",
    key: jax.Array | None = None,
) -> Selection:
    """Remove exactly ``n_remove`` entries of the flat ``scores``: forced ones first, then
    the highest (``highest``) or lowest scores, ties at the threshold by ``tie_break``.

    ``segment_sizes`` splits the flat vector into consecutive layers only for
    counting ties per layer (default: one segment). ``key`` is required for
    ``tie_break="random"``.
    """
    size = int(np.size(scores))
    sizes = (size,) if segment_sizes is None else tuple(segment_sizes)
    forced = jnp.zeros(scores.shape, bool) if forced is None else forced
    if n_remove == 0:  # nothing to remove (and nothing forced: checked by the caller)
        zeros = jnp.zeros(len(sizes), jnp.int32)
        return Selection(jnp.ones(scores.shape, bool), zeros, jnp.asarray(0), jnp.asarray(0.0))
    # n_remove is traced, not static, so that the rounds of iterative pruning
    # (a new count each round) reuse one compiled selection.
    count = jnp.asarray(n_remove, jnp.int64 if n_remove >= 2**31 else jnp.int32)
    ends = jnp.asarray(np.cumsum(sizes), jnp.int64 if size >= 2**31 else jnp.int32)
    random_ties = tie_break == "random"
    tie_key = key if random_ties else jax.random.PRNGKey(0)
    return _select(
        scores, forced, count, ends, tie_key, highest=bool(highest), random_ties=random_ties
    )


def check_tie_break(tie_break: str, key: jax.Array | None) -> None:
    """ValueError unless ``tie_break`` is known and ``key`` is given exactly when it is random."""
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    if tie_break == "random" and key is None:
        raise ValueError(
            "tie_break='random' needs key= (a jax.random key) so the mask is reproducible"
        )
    if tie_break == "position" and key is not None:
        raise ValueError(
            "key= is used only with tie_break='random'; drop it or set tie_break='random'"
        )
