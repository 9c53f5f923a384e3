"""Which end of each criterion's ranking is pruned, and reading it from a call.

A score is only half of a criterion: GraSP removes its *highest* scores, the
others their lowest. A default direction silently inverts whichever criterion
it does not fit, so every selection asks for the direction explicitly, either
as ``direction=`` or through a criterion name that implies it.

Before 0.3 the direction keyword was ``prune=``, the name of the function that
takes it; it still works for one release with a
:class:`~grasp_jax.GraspJaxDeprecationWarning` (:func:`direction_keyword`).
"""

from __future__ import annotations

import warnings
from typing import Literal

from grasp_jax._deprecation import GraspJaxDeprecationWarning

Direction = Literal["highest", "lowest"]

__all__ = ["PRUNE_DIRECTION", "Direction", "direction_keyword", "resolve_direction"]

# Which end of each criterion's ranking is removed.
PRUNE_DIRECTION: dict[str, Direction] = {
    "grasp": "highest",  # S(-θ) = -θ⊙Hg: removing these reduces gradient flow least
    "grasp_abs": "lowest",  # |θ⊙Hg| (Lubana & Dick, 2021): removing these changes it least
    "snip": "lowest",
    "synflow": "lowest",
    "magnitude": "lowest",
    "random": "lowest",
}


def direction_keyword(
    direction: str | None, prune: str | None, *, stacklevel: int = 3
) -> str | None:
    """``direction``, or the same value given by the deprecated keyword ``prune=``.

    ``prune=`` warns with a :class:`~grasp_jax.GraspJaxDeprecationWarning` that
    names ``direction=``; both given and different is a ValueError (checked
    before the warning: the call fails either way). The default ``stacklevel``
    points the warning at the caller of the public function that calls this.
    """
    if prune is None:
        return direction
    if direction is not None and direction != prune:
        raise ValueError(
            f"direction={direction!r} contradicts the deprecated prune={prune!r}; "
            "pass only direction="
        )
    warnings.warn(
        f"the keyword prune= is deprecated since grasp_jax 0.3.0 and goes in 0.4.0: "
        f"pass direction={prune!r} instead",
        GraspJaxDeprecationWarning,
        stacklevel=stacklevel,
    )
    return prune


def resolve_direction(
    direction: str | None = None,
    criterion: str | None = None,
    *,
    prune: str | None = None,
) -> Direction:
    """The direction given by ``direction``, or implied by ``criterion`` via
    :data:`PRUNE_DIRECTION`.

    Exactly one is needed; both are accepted only when they agree. A ValueError
    names both choices when neither is given, and the conflict when they differ.
    ``prune`` is the deprecated name of ``direction`` (see :func:`direction_keyword`).
    """
    direction = direction_keyword(direction, prune)
    if direction is not None and direction not in ("highest", "lowest"):
        raise ValueError(f"direction must be 'highest' or 'lowest', got {direction!r}")
    if criterion is not None and criterion not in PRUNE_DIRECTION:
        raise ValueError(
            f"unknown criterion {criterion!r}; known: {sorted(PRUNE_DIRECTION)} "
            "(or pass direction='highest'|'lowest' instead)"
        )
    implied = PRUNE_DIRECTION[criterion] if criterion is not None else None
    if direction is None and implied is None:
        raise ValueError(
            "the pruning direction is required: pass direction='highest' (remove the highest "
            "scores, as GraSP does) or direction='lowest' (SNIP, SynFlow, magnitude, random), "
            f"or criterion= one of {sorted(PRUNE_DIRECTION)}, which implies it"
        )
    if direction is not None and implied is not None and direction != implied:
        raise ValueError(
            f"direction={direction!r} contradicts criterion={criterion!r}, which prunes the "
            f"{implied} scores; pass only one of them"
        )
    return direction if direction is not None else implied
