"""Which end of each criterion's ranking is pruned, and reading it from a call.

A score is only half of a criterion: GraSP removes its *highest* scores, the
others their lowest. A default direction silently inverts whichever criterion
it does not fit, so every selection asks for the direction explicitly, either
as ``prune=`` or through a criterion name that implies it.
"""

from __future__ import annotations

from typing import Literal

Direction = Literal["highest", "lowest"]

# Which end of each criterion's ranking is removed.
PRUNE_DIRECTION: dict[str, Direction] = {
    "grasp": "highest",  # S(-θ) = -θ⊙Hg: removing these reduces gradient flow least
    "grasp_abs": "lowest",  # |θ⊙Hg| (Lubana & Dick, 2021): removing these changes it least
    "snip": "lowest",
    "synflow": "lowest",
    "magnitude": "lowest",
    "random": "lowest",
}


def resolve_direction(prune: str | None = None, criterion: str | None = None) -> Direction:
    """The direction given by ``prune``, or implied by ``criterion`` via :data:`PRUNE_DIRECTION`.

    Exactly one is needed; both are accepted only when they agree. A ValueError
    names both choices when neither is given, and the conflict when they differ.
    """
    if prune is not None and prune not in ("highest", "lowest"):
        raise ValueError(f"prune must be 'highest' or 'lowest', got {prune!r}")
    if criterion is not None and criterion not in PRUNE_DIRECTION:
        raise ValueError(
            f"unknown criterion {criterion!r}; known: {sorted(PRUNE_DIRECTION)} "
            "(or pass prune='highest'|'lowest' instead)"
        )
    implied = PRUNE_DIRECTION[criterion] if criterion is not None else None
    if prune is None and implied is None:
        raise ValueError(
            "the pruning direction is required: pass prune='highest' (remove the highest "
            "scores, as GraSP does) or prune='lowest' (SNIP, SynFlow, magnitude, random), "
            f"or criterion= one of {sorted(PRUNE_DIRECTION)}, which implies it"
        )
    if prune is not None and implied is not None and prune != implied:
        raise ValueError(
            f"prune={prune!r} contradicts criterion={criterion!r}, which prunes the "
            f"{implied} scores; pass only one of them"
        )
    return prune if prune is not None else implied
