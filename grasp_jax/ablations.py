"""Sanity checks for pruning-at-init methods (Frankle et al., ICLR 2021).

If a method's accuracy survives shuffling its mask within each layer, or
inverting its ranking, the method is choosing layer densities, not weights.
These functions make those checks one call each.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax.masks import (
    Direction,
    Scope,
    apply_masks,
    check_same_structure,
    masks_from_scores,
)
from grasp_jax.prunable import (
    PrunableSpec,
    merge_prunable,
    prunable_flags,
    split_prunable,
)

PyTree = Any


def shuffle_masks(masks: PyTree, key: jax.Array, *, prunable: PrunableSpec = None) -> PyTree:
    """Permute each prunable leaf's mask at random: same density per layer, new positions."""
    flags = prunable_flags(masks, prunable)
    theta, rest, treedef = split_prunable(masks, flags)
    keys = jax.random.split(key, len(flags))[np.flatnonzero(flags)]
    shuffled = [jnp.reshape(jax.random.permutation(k, jnp.ravel(m)), jnp.shape(m))
                for m, k in zip(theta, keys)]
    return merge_prunable(shuffled, rest, flags, treedef)


def inverted_masks(
    scores: PyTree,
    sparsity: float,
    *,
    prune: Direction,
    scope: Scope = "global",
    prunable: PrunableSpec = None,
) -> PyTree:
    """Keep the weights the method would prune first, keeping as many as it would.

    ``prune`` is the method's own direction; the ranking is read from the
    other end, so the kept count is unchanged.
    """
    return masks_from_scores(scores, sparsity, prune=inverted_direction(prune), scope=scope,
                             prunable=prunable)


def inverted_direction(prune: Direction) -> Direction:
    """The other end of the ranking: prune what the method would keep (iterative runs too)."""
    if prune not in ("highest", "lowest"):
        raise ValueError(f"prune must be 'highest' or 'lowest', got {prune!r}")
    return "lowest" if prune == "highest" else "highest"


def reinitialized(fresh_params: PyTree, masks: PyTree) -> PyTree:
    """The mask applied to a fresh initialization (new seed): values change only where kept."""
    check_same_structure(masks, fresh_params)
    return apply_masks(fresh_params, masks)
