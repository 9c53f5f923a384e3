"""The ablations of a run (``--ablation``), all in one place: what each changes, and where.

- ``invert``: prune the other end of the criterion's ranking (keep what it
  would remove): :func:`pruning_direction`, while the masks are computed.
- ``shuffle``: the same number of kept weights per layer, at random positions
  (does the criterion pick weights, or only layer densities?):
  :func:`ablated_masks`, once the masks are computed.
- ``reinit``: the same masks on a fresh initialization (do the kept weights'
  values matter, or only where they are?): :func:`training_variables`, on the
  variables training starts from.

``experiments.methods.compute_masks`` applies the first two; the run applies
the third to the network it trains. The operations themselves are the core's
(``grasp_jax.ablations``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

import grasp_jax as gj

from experiments.config_schema import Config

PyTree = Any


def pruning_direction(config: Config, direction: str) -> str:
    """The end of the ranking the run removes: the criterion's, or the other under ``invert``."""
    if config.ablation == "invert":
        return gj.ablations.inverted_direction(direction)
    return direction


def ablated_masks(config: Config, masks: PyTree, key: jax.Array) -> PyTree:
    """The masks the run trains with: ``shuffle`` moves each layer's kept weights to random
    positions (key: ``fold_in(key, 2)`` of the pruning key); other runs keep them."""
    if config.ablation == "shuffle":
        return gj.ablations.shuffle_masks(masks, jax.random.fold_in(key, 2))
    return masks


def training_variables(config: Config, variables: PyTree, masks: PyTree,
                       fresh_variables: Callable[[], PyTree],
                       log: Callable[[str], None] = print) -> PyTree:
    """The variables training starts from: under ``reinit``, ``fresh_variables()`` (a new
    initialization) with the pruned weights zeroed; otherwise ``variables``."""
    if config.ablation != "reinit":
        return variables
    # Same masks, new weights: does the method pick weights or just layer densities?
    fresh = fresh_variables()
    log("ablation reinit: training the kept weights from a fresh initialization")
    return {**fresh, "params": gj.ablations.reinitialized(fresh["params"], masks)}
