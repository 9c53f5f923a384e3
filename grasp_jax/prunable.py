"""Which leaves of a params pytree are prunable, and what to call them.

Scoring, masking and reporting all need the same two facts about a leaf: a
readable name (``"block1/conv1/kernel"``) and whether it is one of the weights
θ that pruning removes. They live here so that every module agrees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
KeyPath = tuple
PrunableSpec = None | PyTree | Callable[[KeyPath, Any], bool]

__all__ = [
    "WEIGHT_NAMES", "PrunableSpec", "default_is_prunable", "merge_prunable", "path_name",
    "prunable_flags", "split_prunable",
]


def _key_name(key: Any) -> str | None:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        # Flax NNX wraps every array in a Variable whose pytree child is
        # `.value`; it says nothing about the layer, so leave it out.
        return None if key.name == "value" else key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_name(path: KeyPath) -> str:
    """``(DictKey('conv1'), DictKey('kernel'))`` -> ``"conv1/kernel"``."""
    names = [n for n in (_key_name(k) for k in path) if n is not None]
    return "/".join(names) if names else "<root>"


# What Conv/Dense weights are called: Flax ``kernel``, Equinox (and PyTorch) ``weight``,
# Haiku ``w``.
WEIGHT_NAMES = ("kernel", "weight", "w")


def default_is_prunable(path: KeyPath, leaf: Any) -> bool:
    """A Conv/Dense weight: a leaf named ``kernel``, ``weight`` or ``w`` with at least two axes.

    Biases, BatchNorm scales/offsets and embeddings (Flax ``embedding``,
    Haiku ``embeddings``) are left dense, as in the paper (whose reference code
    prunes only ``nn.Conv2d``/``nn.Linear`` weights).
    """
    names = [n for n in (_key_name(k) for k in path) if n is not None]
    return bool(names) and names[-1] in WEIGHT_NAMES and np.ndim(leaf) >= 2


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """(name, leaf) for every leaf, in flattening order."""
    return [(path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def prunable_flags(params: PyTree, prunable: PrunableSpec = None) -> tuple[bool, ...]:
    """One Python bool per leaf of ``params`` (flattening order).

    ``prunable`` is ``None`` (use :func:`default_is_prunable`), a callable
    ``(path, leaf) -> bool``, or a pytree of bools with the structure of
    ``params``. The result is a hashable tuple so that it can be a static
    argument of a jitted function. Works on tracers: only shapes are read.
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    if prunable is None or callable(prunable):
        fn = default_is_prunable if prunable is None else prunable
        flags = tuple(bool(fn(p, x)) for p, x in leaves_with_path)
    else:
        flag_leaves, flag_def = jax.tree_util.tree_flatten(prunable)
        if flag_def != treedef:
            raise ValueError(
                "`prunable` must be None, a callable (path, leaf) -> bool, or a pytree of "
                f"bools with the structure of params; got structure {flag_def}, "
                f"params have {treedef}"
            )
        flags = tuple(bool(f) for f in flag_leaves)
    if not any(flags):
        names = [path_name(p) for p, _ in leaves_with_path]
        raise ValueError(
            "no prunable leaf in params: by default only leaves named 'kernel', 'weight' or 'w' "
            "with ndim >= 2 "
            f"are pruned (leaves seen: {names[:20]}{' ...' if len(names) > 20 else ''}); "
            "pass `prunable=` to choose others"
        )
    return flags


def check_leaf_dtypes(tree: PyTree, flags: Sequence[bool], *, what: str = "params",
                      integers: bool = False) -> None:
    """TypeError naming the first prunable leaf of ``tree`` that is not an array of
    floating-point numbers (``integers``: of real numbers, integers allowed).

    θ is differentiated (JAX's own error would not say which leaf) and ranked;
    an integer weight, a boolean or complex score, or an array of objects means
    the wrong tree was passed. Only dtypes are read: works on tracers.
    """
    named = jax.tree_util.tree_flatten_with_path(tree)[0]
    if len(named) != len(flags):
        raise ValueError(f"{what} have {len(named)} leaves but flags has {len(flags)}")
    wanted = "floating-point" + (" or integer" if integers else "")
    for (path, leaf), flag in zip(named, flags):
        if not flag:
            continue
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            raise TypeError(f"{what} leaf {path_name(path)!r} is a {type(leaf).__name__}, not "
                            f"an array of {wanted} numbers")
        ok = jnp.issubdtype(dtype, jnp.floating) or (
            integers and jnp.issubdtype(dtype, jnp.integer))
        if not ok:
            hint = "; pass prunable= to leave it out" if what == "params" else ""
            raise TypeError(f"{what} leaf {path_name(path)!r} has dtype {dtype}, not "
                            f"{wanted}{hint}")


# --------------------------------------------------------------------------
# θ (the prunable leaves) apart from the rest, and back.


def split_prunable(params: PyTree, flags: Sequence[bool]) -> tuple[list, list, Any]:
    """``(theta, rest, treedef)``: the prunable leaves, the others, and the structure.

    Both lists are in flattening order; ``flags`` is :func:`prunable_flags` of
    ``params`` (or of any tree with its structure, such as its masks).
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if len(leaves) != len(flags):
        raise ValueError(f"params have {len(leaves)} leaves but flags has {len(flags)}")
    theta = [x for x, f in zip(leaves, flags) if f]
    rest = [x for x, f in zip(leaves, flags) if not f]
    return theta, rest, treedef


def merge_prunable(theta: Sequence[Any], rest: Sequence[Any], flags: Sequence[bool],
                   treedef: Any) -> PyTree:
    """The inverse of :func:`split_prunable`: one tree with ``theta`` at the prunable leaves."""
    theta_it, rest_it = iter(theta), iter(rest)
    leaves = [next(theta_it) if f else next(rest_it) for f in flags]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def scatter_prunable(theta_values: Sequence[Any], params: PyTree, flags: Sequence[bool]) -> PyTree:
    """A tree like ``params`` with ``theta_values`` at prunable leaves and zeros elsewhere."""
    _, rest, treedef = split_prunable(params, flags)
    return merge_prunable(theta_values, [jnp.zeros_like(r) for r in rest], flags, treedef)
