"""An optax transformation that keeps pruned weights at exactly zero.

``optax.masked`` picks which *leaves* a transformation touches; pruning needs
an *elementwise* mask inside each leaf, held in the optimizer state so that it
is checkpointed and replicated with the rest of training.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from grasp_jax.masks import check_mask_dtypes, check_same_structure

PyTree = Any

__all__ = ["MaskedUpdatesState", "masked_updates"]


class MaskedUpdatesState(NamedTuple):
    """The keep-masks (booleans with the structure of params)."""

    masks: PyTree


def masked_updates(masks: PyTree) -> optax.GradientTransformation:
    """Multiply every update by its mask: ``u ← u ⊙ m``.

    Put it last in an ``optax.chain`` so that whatever the optimizer before it
    does (momentum, weight decay, Adam's moments), the final update of a pruned
    weight is 0 and a weight that starts at 0 stays exactly 0.0. Putting a
    second copy first as well also keeps the optimizer's own state zero there::

        tx = optax.chain(optax.sgd(0.1, momentum=0.9), masked_updates(masks))

    ``jnp.where`` is used rather than a product so that a non-finite update of
    a pruned weight cannot turn it into NaN.
    """

    check_mask_dtypes(masks)

    def init_fn(params: PyTree) -> MaskedUpdatesState:
        check_same_structure(masks, params, "masks", "params")
        as_bool = jax.tree_util.tree_map(lambda m: jnp.asarray(m, bool), masks)
        return MaskedUpdatesState(masks=as_bool)

    def update_fn(updates, state: MaskedUpdatesState, params=None):
        del params
        # Shapes are static, so under jit this runs once at trace time and
        # costs nothing per step; without it jnp.where would broadcast an
        # update of shape (1, 3) against a (4, 3) mask.
        check_same_structure(state.masks, updates, "masks", "updates")
        updates = jax.tree_util.tree_map(
            lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, state.masks
        )
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)
