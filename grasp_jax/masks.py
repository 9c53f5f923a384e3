"""From scores to masks, masks onto params, and what the masks leave.

Masks are boolean pytrees with the structure of params: ``True`` keeps a
weight, ``False`` prunes it. Leaves that are not prunable get all-``True``
masks, so every mask tree can be applied to every leaf the same way.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax.budgets import SCOPES, check_sparsity, layer_removal_counts, num_to_prune
from grasp_jax.criteria import Direction, direction_keyword, resolve_direction
from grasp_jax.prunable import PrunableSpec, check_leaf_dtypes, path_name, prunable_flags
from grasp_jax.scoring import check_finite
from grasp_jax.selection import Selection, TieBreak, check_tie_break, select_removal

PyTree = Any
Scope = Literal["global", "layerwise", "uniform", "erk"]

__all__ = [  # check_sparsity and num_to_prune live in budgets.py, Direction in criteria.py
    "Direction", "LayerCollapseWarning", "LayerDensity", "Scope", "SparsityReport", "TieWarning",
    "apply_masks", "check_same_structure", "check_sparsity", "masks_from_scores", "num_to_prune",
    "sparsity_report",
]


def check_same_structure(
    a: PyTree, b: PyTree, what_a: str = "masks", what_b: str = "params"
) -> None:
    """ValueError unless ``a`` and ``b`` have the same tree structure and leaf shapes."""
    da, db = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    if da != db:
        raise ValueError(
            f"{what_a} and {what_b} differ in structure:\n  {what_a}: {da}\n  {what_b}: {db}"
        )
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                            jax.tree_util.tree_leaves(b)):
        if np.shape(x) != np.shape(y):
            raise ValueError(
                f"{what_a} and {what_b} differ in shape at {path_name(path)}: "
                f"{np.shape(x)} vs {np.shape(y)}"
            )


def check_mask_dtypes(masks: PyTree, what: str = "masks") -> None:
    """TypeError naming the first leaf of ``masks`` that is not an array of booleans or
    real numbers (a keep-mask is read as ``m != 0``; a complex, string or object array,
    or a leaf that is no array at all, means the wrong tree was passed). Dtypes only."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(masks)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None and isinstance(leaf, (bool, int, float)):
            continue  # a Python scalar mask of a scalar leaf
        if dtype is None:
            raise TypeError(f"{what} leaf {path_name(path)!r} is a {type(leaf).__name__}, not "
                            "an array of booleans")
        if not (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.integer)
                or jnp.issubdtype(dtype, jnp.floating)):
            raise TypeError(f"{what} leaf {path_name(path)!r} has dtype {dtype}, not bool")


class LayerCollapseWarning(UserWarning):
    """Masks leave a prunable layer with no weight at all.

    Such a layer passes no signal (or only its bias) and every layer after it
    gets no gradient: at high sparsity a global ranking can empty whole layers
    (Tanaka et al., 2020, call this layer collapse).
    """


class TieWarning(UserWarning):
    """The tie-break, not the scores, chose a noticeable part of the removed weights.

    Raised when the threshold falls inside a block of equal scores and the
    weights removed from it are at least :data:`TIE_WARN_FRACTION` of all the
    weights removed.
    """


TIE_WARN_FRACTION = 0.01


# --------------------------------------------------------------------------
# Public API.


def masks_from_scores(
    scores: PyTree,
    sparsity: float,
    *,
    prunable: PrunableSpec = None,
    scope: Scope = "global",
    direction: Direction | None = None,
    criterion: str | None = None,
    masks: PyTree | None = None,
    tie_break: TieBreak = "position",
    key: jax.Array | None = None,
    prune: Direction | None = None,
) -> PyTree:
    """Boolean keep-masks that remove exactly round(sparsity × #prunable) weights.

    Args:
      scores: a pytree like params (from any ``*_scores`` function).
      sparsity: the fraction of prunable weights to remove, in [0, 1).
      prunable: which leaves are prunable (default: ``kernel`` leaves with
        ndim >= 2); pass the same value given to the scoring function.
      scope: ``"global"`` ranks all prunable weights together (the paper);
        the others fix each prunable leaf's count first and rank within it:
        ``"layerwise"`` (or its synonym ``"uniform"``) removes round(s · N_l)
        from each leaf, ``"erk"`` splits round(s · N) over the leaves by the
        Erdős–Rényi-Kernel rule (see :mod:`grasp_jax.budgets`).
      direction: ``"highest"`` removes the highest scores (GraSP's S(-θ));
        ``"lowest"`` the lowest (SNIP, SynFlow, magnitude). There is no
        default: pass ``direction`` or ``criterion``.
      criterion: a name in :data:`~grasp_jax.criteria.PRUNE_DIRECTION`
        (``"grasp"``, ``"snip"``, ...) that implies ``direction``.
      masks: optional current masks; weights they prune stay pruned and count
        towards the target (iterative pruning).
      tie_break: how the weights removed from a block of equal scores at the
        threshold are chosen: ``"position"`` (earlier leaves and earlier flat
        indices first) or ``"random"`` (a random subset drawn from ``key``).
        Both are deterministic.
      key: a ``jax.random`` key, required for (and only for) ``"random"``.
      prune: the name of ``direction`` before 0.3; deprecated, it warns.

    Raises ValueError when the count round(sparsity × N) is all N prunable
    weights (in a per-layer scope: when a leaf's count is all of that leaf). Warns with
    :class:`LayerCollapseWarning`, naming them, when the masks empty whole
    prunable leaves, and with :class:`TieWarning` when the tie-break chooses
    at least 1% of the removed weights.
    """
    sparsity = check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    direction = direction_keyword(direction, prune)
    highest = resolve_direction(direction, criterion) == "highest"
    check_tie_break(tie_break, key)
    flags = prunable_flags(scores, prunable)
    check_leaf_dtypes(scores, flags, what="scores", integers=True)
    if masks is not None:
        check_same_structure(masks, scores, "masks", "scores")
    check_finite(scores, prunable=prunable)

    named, treedef = jax.tree_util.tree_flatten_with_path(scores)
    layers = _prunable_layers(named, masks, flags)
    how = {"highest": highest, "tie_break": tie_break, "key": key}
    if scope == "global":
        keeps, checks = _select_global(layers, sparsity, **how)
    else:
        counts = layer_removal_counts(
            [layer.shape for layer in layers], sparsity, scope,
            already_removed=None if masks is None else _forced_counts(layers),
        )
        keeps, checks = _select_per_layer(layers, counts, sparsity, **how)
    flat_keeps = iter(keeps)
    out = [jnp.reshape(next(flat_keeps), np.shape(x)) if f else jnp.ones(np.shape(x), bool)
           for (_, x), f in zip(named, flags)]
    _warn_ties(checks, tie_break)
    _warn_collapsed([layer.name for layer in layers], keeps)
    return jax.tree_util.tree_unflatten(treedef, out)


class _Layer(NamedTuple):
    name: str
    shape: tuple[int, ...]
    scores: jax.Array  # flat
    forced: jax.Array  # flat bool: already pruned by the current masks


def _prunable_layers(named: list, masks: PyTree | None, flags: tuple[bool, ...]) -> list[_Layer]:
    old = jax.tree_util.tree_leaves(masks) if masks is not None else [None] * len(named)
    return [
        _Layer(path_name(p), np.shape(x), jnp.ravel(x), jnp.zeros(np.size(x), bool) if m is None
               else ~jnp.ravel(jnp.asarray(m, bool)))
        for (p, x), m, f in zip(named, old, flags) if f
    ]


class _TieCheck(NamedTuple):
    names: tuple[str, ...]  # the layers of one selection, in order
    n_remove: int
    selection: Selection


def _select_global(layers: list[_Layer], sparsity: float, **how) -> tuple[list, list]:
    flat = jnp.concatenate([layer.scores for layer in layers])
    forced = jnp.concatenate([layer.forced for layer in layers])
    n = num_to_prune(sparsity, flat.size)
    _check_not_all(n, flat.size, sparsity, "the prunable weights")
    _check_not_below_current(forced, n, "all prunable weights")
    sizes = tuple(int(layer.scores.size) for layer in layers)
    sel = select_removal(flat, n, forced=forced, segment_sizes=sizes, **how)
    keeps = jnp.split(sel.keep, np.cumsum(sizes)[:-1])
    return keeps, [_TieCheck(tuple(layer.name for layer in layers), n, sel)]


def _forced_counts(layers: list[_Layer]) -> list[int]:
    return [int(c) for c in jax.device_get([jnp.sum(layer.forced) for layer in layers])]


def _select_per_layer(layers: list[_Layer], counts: list[int], sparsity: float, *, key,
                      **how) -> tuple[list, list]:
    keeps, checks = [], []
    for i, (layer, n) in enumerate(zip(layers, counts)):
        _check_not_all(n, int(layer.scores.size), sparsity, f"layer {layer.name}")
        _check_not_below_current(layer.forced, n, f"layer {layer.name}")
        layer_key = None if key is None else jax.random.fold_in(key, i)
        sel = select_removal(layer.scores, n, forced=layer.forced, key=layer_key, **how)
        keeps.append(sel.keep)
        checks.append(_TieCheck((layer.name,), n, sel))
    return keeps, checks


def _warn_ties(checks: list[_TieCheck], tie_break: str) -> None:
    figures = jax.device_get([(c.selection.tied, c.selection.tied_removed, c.selection.tie_value)
                              for c in checks])  # one sync for all selections
    found = []
    for check, (tied, removed, value) in zip(checks, figures):
        removed, n_tied = int(removed), int(np.sum(tied))
        # A tie that is removed whole (or kept whole) is decided by the scores.
        if 0 < removed < n_tied and removed >= TIE_WARN_FRACTION * check.n_remove:
            where = ", ".join(f"{name} ({int(t):,})" for name, t in zip(check.names, tied) if t)
            found.append(
                f"the tie-break ({tie_break!r}) chose {removed:,} of the {check.n_remove:,} "
                f"weights removed ({removed / check.n_remove:.1%}) among {n_tied:,} weights whose "
                f"score equals the threshold {float(value):.6g}; layers with tied weights: {where}"
            )
    if found:  # one warning for all selections (a layerwise scope makes one per layer)
        warnings.warn(
            ";\n".join(found) + ".\nThe scores do not rank these weights (e.g. exact zeros behind "
            "a zero-initialized BatchNorm scale); tie_break='random' with key= draws them at "
            "random instead",
            TieWarning,
            stacklevel=3,
        )


def _check_not_all(n_remove: int, size: int, sparsity: float, where: str) -> None:
    # A sparsity just below 1 passes check_sparsity yet rounds to every weight:
    # refuse it as 1.0 itself is refused, rather than return an empty network.
    if n_remove < size:
        return
    if n_remove == num_to_prune(sparsity, size):  # the count is round(s·N): say where it stops
        how = f"round({sparsity!r} × {size:,}) = {n_remove:,}"
        advice = f"choose a sparsity below {1 - 0.5 / size:.6g}"
    else:  # a budget (ERK) gave this count
        how, advice = f"{n_remove:,}", "choose a lower sparsity or another scope"
    raise ValueError(f"sparsity {sparsity!r} removes {how} weights, all of {where}; {advice}")


def _warn_collapsed(names: list[str], keeps: list[jax.Array]) -> None:
    kept = jax.device_get([jnp.any(k) for k in keeps])  # one sync for all leaves
    empty = [name for name, k in zip(names, kept) if not k]
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
    check_mask_dtypes(masks)
    check_mask_dtypes(params, "params")
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
        rows.append(f"\nSparsity {self.sparsity:.4%}; {self.dense_params:,} non-prunable "
                    "parameters kept dense.")
        if self.collapsed:
            rows.append(f"\n**{self._collapsed_line()}.**")
        return "\n".join(rows)

    def __str__(self) -> str:
        width = max([len(l.name) for l in self.layers] + [12])
        lines = [f"{'layer':<{width}}  {'shape':>18}  {'kept':>12}  {'total':>12}  density"]
        for l in self.layers:
            shape = "x".join(map(str, l.shape))
            lines.append(f"{l.name:<{width}}  {shape:>18}  {l.kept:>12,}  {l.total:>12,}  "
                         f"{l.density:7.2%}")
        lines.append(f"{'all prunable':<{width}}  {'':>18}  {self.kept:>12,}  {self.total:>12,}  "
                     f"{self.density:7.2%}")
        if self.collapsed:
            lines.append(self._collapsed_line())
        return "\n".join(lines)


def sparsity_report(masks: PyTree, *, prunable: PrunableSpec = None) -> SparsityReport:
    """Count what ``masks`` keep in each prunable leaf (one device sync for all)."""
    check_mask_dtypes(masks)
    flags = prunable_flags(masks, prunable)
    named = jax.tree_util.tree_flatten_with_path(masks)[0]
    kept = jax.device_get([jnp.sum(jnp.asarray(m, bool)) for (_, m), f in zip(named, flags) if f])
    layers = tuple(
        LayerDensity(path_name(p), tuple(np.shape(m)), int(k), int(np.size(m)))
        for ((p, m), k) in zip([nm for nm, f in zip(named, flags) if f], kept)
    )
    dense = sum(int(np.size(m)) for (_, m), f in zip(named, flags) if not f)
    return SparsityReport(layers, dense)
