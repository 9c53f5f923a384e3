"""From scores to masks, masks onto params, and what the masks leave.

Masks are boolean pytrees with the structure of params: ``True`` keeps a
weight, ``False`` prunes it. Leaves that are not prunable get all-``True``
masks, so every mask tree can be applied to every leaf the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax.criteria import Direction, resolve_direction
from grasp_jax.prunable import PrunableSpec, path_name, prunable_flags
from grasp_jax.scoring import check_finite

PyTree = Any
Scope = Literal["global", "layerwise"]


def check_same_structure(a: PyTree, b: PyTree, what_a: str = "masks", what_b: str = "params") -> None:
    """ValueError unless ``a`` and ``b`` have the same tree structure and leaf shapes."""
    da, db = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    if da != db:
        raise ValueError(f"{what_a} and {what_b} differ in structure:\n  {what_a}: {da}\n  {what_b}: {db}")
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
        if np.shape(x) != np.shape(y):
            raise ValueError(
                f"{what_a} and {what_b} differ in shape at {path_name(path)}: "
                f"{np.shape(x)} vs {np.shape(y)}"
            )


class LayerCollapseWarning(UserWarning):
    """Masks leave a prunable layer with no weight at all.

    Such a layer passes no signal (or only its bias) and every layer after it
    gets no gradient: at high sparsity a global ranking can empty whole layers
    (Tanaka et al., 2020, call this layer collapse).
    """


def num_to_prune(sparsity: float, size: int) -> int:
    """round(sparsity × size), halves rounded up, so the count is the same everywhere."""
    return math.floor(sparsity * size + 0.5)


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` as a float, or a ValueError unless it is a number in [0, 1)."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= s < 1.0:  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return s


# --------------------------------------------------------------------------
# Exact selection of the n most prunable entries.
#
# Sorting 138M scores (VGG16) is slow on CPU and memory hungry; instead the
# threshold is found by bisection over the order-preserving unsigned-integer
# image of the floats: 32 (or 64) passes that each count how many entries lie
# above a candidate. Ties at the threshold are broken by flat position, first
# come first pruned, so the result is exact and deterministic.


def _ordered_uint(x: jax.Array) -> jax.Array:
    """A uint whose order is the float order of ``x`` (-0.0 just below +0.0)."""
    if x.dtype == jnp.float64:
        itype, utype, bits = jnp.int64, jnp.uint64, 64
    else:
        x = x.astype(jnp.float32)
        itype, utype, bits = jnp.int32, jnp.uint32, 32
    i = jax.lax.bitcast_convert_type(x, itype)
    u = jax.lax.bitcast_convert_type(i, utype)
    sign = jnp.asarray(1, utype) << (bits - 1)
    # Positive floats: set the sign bit (they sort above all negatives).
    # Negative floats: flip every bit (larger magnitude -> smaller key).
    return jnp.where(i < 0, ~u, u | sign)


@functools.partial(jax.jit, static_argnames=("highest",))
def _keep_mask(scores: jax.Array, forced: jax.Array, n_remove: jax.Array, *, highest: bool) -> jax.Array:
    """Keep-mask removing exactly ``n_remove`` entries of a flat ``scores``.

    Entries with ``forced`` set are removed first (already-pruned weights in
    iterative pruning); the rest are removed from the highest score down
    (``highest``) or the lowest up.
    """
    key = _ordered_uint(scores)
    if not highest:
        key = ~key  # reverse the order: the lowest score gets the largest key
    utype = key.dtype
    top = jnp.iinfo(utype).max
    # Forced entries get the largest key; scores never map there (NaN is
    # rejected earlier and the largest finite/inf images are below it).
    key = jnp.where(forced, jnp.asarray(top, utype), key)
    bits = jnp.iinfo(utype).bits

    # Largest t with #{key >= t} >= n_remove, by bisection on [0, top].
    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + ((hi - lo) >> 1) + ((hi - lo) & 1)
        enough = jnp.sum(key >= mid) >= n_remove
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(
        0, bits + 1, body, (jnp.asarray(0, utype), jnp.asarray(top, utype))
    )
    above = key > lo
    ties = key == lo
    n_ties_to_remove = n_remove - jnp.sum(above)
    tie_rank = jnp.cumsum(ties.astype(jnp.int32 if key.size < 2**31 else jnp.int64))
    remove = above | (ties & (tie_rank <= n_ties_to_remove))
    return ~remove


def _select(flat_scores, forced, n_remove: int, highest: bool) -> jax.Array:
    if n_remove == 0:  # nothing to remove (and nothing forced: checked by the caller)
        return jnp.ones(flat_scores.shape, bool)
    # n_remove is traced, not static, so that the rounds of iterative pruning
    # (a new count each round) reuse one compiled selection.
    return _keep_mask(flat_scores, forced, jnp.asarray(n_remove, jnp.int64 if n_remove >= 2**31 else jnp.int32),
                      highest=bool(highest))


# --------------------------------------------------------------------------
# Public API.


def masks_from_scores(
    scores: PyTree,
    sparsity: float,
    *,
    prunable: PrunableSpec = None,
    scope: Scope = "global",
    prune: Direction | None = None,
    criterion: str | None = None,
    masks: PyTree | None = None,
) -> PyTree:
    """Boolean keep-masks that remove exactly round(sparsity × #prunable) weights.

    Args:
      scores: a pytree like params (from any ``*_scores`` function).
      sparsity: the fraction of prunable weights to remove, in [0, 1).
      prunable: which leaves are prunable (default: ``kernel`` leaves with
        ndim >= 2); pass the same value given to the scoring function.
      scope: ``"global"`` ranks all prunable weights together (the paper);
        ``"layerwise"`` removes the fraction from each prunable leaf.
      prune: ``"highest"`` removes the highest scores (GraSP's S(-θ));
        ``"lowest"`` the lowest (SNIP, SynFlow, magnitude). There is no
        default: pass ``prune`` or ``criterion``.
      criterion: a name in :data:`~grasp_jax.criteria.PRUNE_DIRECTION`
        (``"grasp"``, ``"snip"``, ...) that implies ``prune``.
      masks: optional current masks; weights they prune stay pruned and count
        towards the target (iterative pruning).

    Ties at the threshold are broken by position (earlier leaves and earlier
    flat indices are pruned first), so the result is deterministic.

    Raises ValueError when the count round(sparsity × N) is all N prunable
    weights (in ``"layerwise"`` scope: all of one leaf). Warns with
    :class:`LayerCollapseWarning`, naming them, when the masks empty whole
    prunable leaves.
    """
    sparsity = check_sparsity(sparsity)
    if scope not in ("global", "layerwise"):
        raise ValueError(f"scope must be 'global' or 'layerwise', got {scope!r}")
    prune = resolve_direction(prune, criterion)
    flags = prunable_flags(scores, prunable)
    if masks is not None:
        check_same_structure(masks, scores, "masks", "scores")
    check_finite(scores, prunable=prunable)

    leaves, treedef = jax.tree_util.tree_flatten(scores)
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(scores)[0]]
    old = jax.tree_util.tree_leaves(masks) if masks is not None else [None] * len(leaves)
    idx = [i for i, f in enumerate(flags) if f]
    forced = [
        jnp.zeros(np.shape(leaves[i]), bool) if old[i] is None else ~jnp.asarray(old[i], bool)
        for i in idx
    ]

    out = [jnp.ones(np.shape(x), bool) for x in leaves]
    highest = prune == "highest"
    if scope == "global":
        flat = jnp.concatenate([jnp.ravel(leaves[i]) for i in idx])
        flat_forced = jnp.concatenate([jnp.ravel(f) for f in forced])
        n = num_to_prune(sparsity, flat.size)
        _check_not_all(n, flat.size, sparsity, "the prunable weights")
        _check_not_below_current(flat_forced, n, "all prunable weights")
        keep = _select(flat, flat_forced, n, highest)
        offset = 0
        for i in idx:
            size = int(np.size(leaves[i]))
            out[i] = jnp.reshape(keep[offset : offset + size], np.shape(leaves[i]))
            offset += size
    else:
        for i, f in zip(idx, forced):
            n = num_to_prune(sparsity, int(np.size(leaves[i])))
            _check_not_all(n, int(np.size(leaves[i])), sparsity, f"layer {names[i]}")
            _check_not_below_current(f, n, f"layer {names[i]}")
            keep = _select(jnp.ravel(leaves[i]), jnp.ravel(f), n, highest)
            out[i] = jnp.reshape(keep, np.shape(leaves[i]))
    result = jax.tree_util.tree_unflatten(treedef, out)
    _warn_collapsed(result, flags)
    return result


def _check_not_all(n_remove: int, size: int, sparsity: float, where: str) -> None:
    # A sparsity just below 1 passes check_sparsity yet rounds to every weight:
    # refuse it as 1.0 itself is refused, rather than return an empty network.
    if n_remove >= size:
        raise ValueError(
            f"sparsity {sparsity!r} removes round({sparsity!r} × {size:,}) = {n_remove:,} weights, "
            f"all of {where}; choose a sparsity below {1 - 0.5 / size:.6g}"
        )


def _warn_collapsed(masks: PyTree, flags: tuple[bool, ...]) -> None:
    named = jax.tree_util.tree_flatten_with_path(masks)[0]
    prunable = [(path_name(p), m) for (p, m), f in zip(named, flags) if f]
    kept = jax.device_get([jnp.any(m) for _, m in prunable])  # one sync for all leaves
    empty = [name for (name, _), k in zip(prunable, kept) if not k]
    if empty:
        warnings.warn(
            f"the masks keep no weight of {len(empty)} prunable layer(s): {', '.join(empty)}",
            LayerCollapseWarning,
            stacklevel=3,
        )


def _check_not_below_current(forced: jax.Array, n_remove: int, where: str) -> None:
    already = int(jnp.sum(forced))
    if already > n_remove:
        raise ValueError(
            f"the current masks already prune {already} weights of {where}, more than the "
            f"{n_remove} the requested sparsity allows; sparsity can only grow"
        )


@jax.jit
def _apply(params, masks):
    return jax.tree_util.tree_map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """``params ⊙ masks`` leaf by leaf; pruned weights become exactly 0."""
    check_same_structure(masks, params)
    return _apply(params, masks)


# --------------------------------------------------------------------------
# Reporting.


@dataclasses.dataclass(frozen=True)
class LayerDensity:
    name: str
    shape: tuple[int, ...]
    kept: int
    total: int

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 1.0


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    """Per prunable leaf and overall: how many weights the masks keep."""

    layers: tuple[LayerDensity, ...]
    dense_params: int  # parameters outside the prunable set (always kept)

    @property
    def kept(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def total(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 1.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def collapsed(self) -> tuple[str, ...]:
        """Names of the prunable layers the masks leave without any weight."""
        return tuple(layer.name for layer in self.layers if layer.total and not layer.kept)

    def _collapsed_line(self) -> str:
        return f"Collapsed (no weight kept): {', '.join(self.collapsed)}" if self.collapsed else ""

    def as_dict(self) -> dict:
        return {
            "layers": [dict(dataclasses.asdict(l), density=l.density) for l in self.layers],
            "kept": self.kept,
            "total": self.total,
            "density": self.density,
            "sparsity": self.sparsity,
            "dense_params": self.dense_params,
            "collapsed": list(self.collapsed),
        }

    def to_markdown(self) -> str:
        rows = ["| layer | shape | kept | total | density |", "|---|---|---:|---:|---:|"]
        for l in self.layers:
            shape = "×".join(map(str, l.shape))
            rows.append(f"| {l.name} | {shape} | {l.kept:,} | {l.total:,} | {l.density:.2%} |")
        rows.append(f"| **all prunable** | | {self.kept:,} | {self.total:,} | {self.density:.2%} |")
        rows.append(f"\nSparsity {self.sparsity:.4%}; {self.dense_params:,} non-prunable parameters kept dense.")
        if self.collapsed:
            rows.append(f"\n**{self._collapsed_line()}.**")
        return "\n".join(rows)

    def __str__(self) -> str:
        width = max([len(l.name) for l in self.layers] + [12])
        lines = [f"{'layer':<{width}}  {'shape':>18}  {'kept':>12}  {'total':>12}  density"]
        for l in self.layers:
            shape = "x".join(map(str, l.shape))
            lines.append(f"{l.name:<{width}}  {shape:>18}  {l.kept:>12,}  {l.total:>12,}  {l.density:7.2%}")
        lines.append(f"{'all prunable':<{width}}  {'':>18}  {self.kept:>12,}  {self.total:>12,}  {self.density:7.2%}")
        if self.collapsed:
            lines.append(self._collapsed_line())
        return "\n".join(lines)


def sparsity_report(masks: PyTree, *, prunable: PrunableSpec = None) -> SparsityReport:
    """Count what ``masks`` keep in each prunable leaf (one device sync for all)."""
    flags = prunable_flags(masks, prunable)
    named = jax.tree_util.tree_flatten_with_path(masks)[0]
    kept = jax.device_get([jnp.sum(jnp.asarray(m, bool)) for (_, m), f in zip(named, flags) if f])
    layers = tuple(
        LayerDensity(path_name(p), tuple(np.shape(m)), int(k), int(np.size(m)))
        for ((p, m), k) in zip([nm for nm, f in zip(named, flags) if f], kept)
    )
    dense = sum(int(np.size(m)) for (_, m), f in zip(named, flags) if not f)
    return SparsityReport(layers, dense)
