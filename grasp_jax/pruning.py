"""One-shot and iterative pruning over any scoring function.

Iterative pruning rescores the *masked* network each round and tightens the
sparsity along a schedule; SynFlow (Tanaka et al., 2020) uses 100 rounds of
the exponential schedule, density_r = (1 - s)^(r / R), which is also how
iterative SNIP and GraSP are usually run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax

from grasp_jax.criteria import Direction, direction_keyword, resolve_direction
from grasp_jax.masks import (
    Scope,
    apply_masks,
    check_sparsity,
    masks_from_scores,
)
from grasp_jax.prunable import PrunableSpec, check_leaf_dtypes, prunable_flags
from grasp_jax.selection import TieBreak, check_tie_break

PyTree = Any
Schedule = Literal["exponential", "linear"]

__all__ = ["prune", "sparsity_schedule"]


def sparsity_schedule(
    sparsity: float, rounds: int, schedule: Schedule = "exponential"
) -> list[float]:
    """The target sparsity after each of ``rounds`` rounds; the last is ``sparsity``.

    exponential: s_r = 1 - (1 - s)^(r/R)  (each round keeps the same fraction)
    linear:      s_r = s · r / R
    """
    sparsity = check_sparsity(sparsity)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    if schedule == "exponential":
        out = [1.0 - (1.0 - sparsity) ** (r / rounds) for r in range(1, rounds + 1)]
    elif schedule == "linear":
        out = [sparsity * r / rounds for r in range(1, rounds + 1)]
    else:
        raise ValueError(f"schedule must be 'exponential' or 'linear', got {schedule!r}")
    out[-1] = sparsity  # exact, whatever the float arithmetic above did
    return out


def prune(
    params: PyTree,
    score_fn: Callable[[PyTree], PyTree],
    sparsity: float,
    *,
    direction: Direction | None = None,
    criterion: str | None = None,
    rounds: int = 1,
    schedule: Schedule = "exponential",
    scope: Scope = "global",
    prunable: PrunableSpec = None,
    tie_break: TieBreak = "position",
    key: jax.Array | None = None,
    callback: Callable[[int, float, PyTree], None] | None = None,
    prune: Direction | None = None,
) -> PyTree:
    """Masks from ``rounds`` rounds of scoring the masked network and pruning.

    Args:
      params: the network at initialization.
      score_fn: ``params -> scores``, e.g.
        ``lambda p: grasp_scores(p, loss_fn, batch)``; it sees the masked
        params in every round after the first.
      sparsity: the final fraction of prunable weights removed.
      direction, criterion: the direction, ``"highest"`` or ``"lowest"``, or a
        criterion name that implies it (see
        :data:`grasp_jax.criteria.PRUNE_DIRECTION`); one is required.
      rounds, schedule: see :func:`sparsity_schedule`. ``rounds=1`` is
        one-shot pruning.
      scope, prunable, tie_break, key: as in
        :func:`grasp_jax.masks.masks_from_scores`; with ``tie_break="random"``
        round r draws its ties from ``fold_in(key, r)``.
      callback: called as ``callback(round, sparsity_r, masks)`` after each
        round (1-based), for progress reporting.
      prune: the name of ``direction`` before 0.3; deprecated, it warns.

    Weights pruned in a round stay pruned in later rounds.
    """
    # Both checks before any scoring is spent.
    direction = resolve_direction(direction_keyword(direction, prune), criterion)
    check_tie_break(tie_break, key)
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable (params -> scores), got "
                        f"{type(score_fn).__name__}")
    check_leaf_dtypes(params, prunable_flags(params, prunable))
    targets = sparsity_schedule(sparsity, rounds, schedule)
    masks = None
    for r, s_r in enumerate(targets, start=1):
        current = params if masks is None else apply_masks(params, masks)
        scores = score_fn(current)
        masks = masks_from_scores(
            scores, s_r, prunable=prunable, scope=scope, direction=direction, masks=masks,
            tie_break=tie_break, key=None if key is None else jax.random.fold_in(key, r),
        )
        if callback is not None:
            callback(r, s_r, masks)
    return masks
