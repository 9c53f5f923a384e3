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

from grasp_jax.criteria import Direction, direction_keyword
from grasp_jax.masks import (
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

__all__ = ["inverted_direction", "inverted_masks", "reinitialized", "shuffle_masks"]


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
    direction: Direction | None = None,
    scope: Scope = "global",
    prunable: PrunableSpec = None,
    prune: Direction | None = None,
) -> PyTree:
    """Keep the weights the method would prune first, keeping as many as it would.

    ``direction`` is the method's own direction (required; ``prune`` is its
    deprecated name); the ranking is read from the other end, so the kept
    count is unchanged.
    """
    direction = direction_keyword(direction, prune)
    return masks_from_scores(scores, sparsity, direction=inverted_direction(direction),
                             scope=scope, prunable=prunable)


def inverted_direction(direction: Direction | None = None, *,
                       prune: Direction | None = None) -> Direction:
    """The other end of the ranking: prune what the method would keep (iterative runs too).

    ``prune`` is the deprecated name of ``direction``.
    """
    direction = direction_keyword(direction, prune)
    if direction not in ("highest", "lowest"):
        raise ValueError(f"direction must be 'highest' or 'lowest', got {direction!r}")
    return "lowest" if direction == "highest" else "highest"


def reinitialized(fresh_params: PyTree, masks: PyTree) -> PyTree:
    """The mask applied to a fresh initialization (new seed): values change only where kept."""
    check_same_structure(masks, fresh_params)
    return apply_masks(fresh_params, masks)
