"""The pruning criteria: one :class:`Criterion` entry each, in :data:`CRITERIA`.

An entry is everything the library knows about a criterion: its name, which
end of its ranking is pruned, what it needs from the data (nothing, the
summed gradient g, or g and the Hessian-vector product Hg) and how its scores
come from those sums. :func:`grasp_jax.scores` and
:func:`grasp_jax.scores_from_batches` score any data-dependent entry (one pass
over the data for ``"gradient"``, two for ``"hvp"``); the data-free ones
(SynFlow, magnitude, random) have their own functions and are entries for
their name and direction. A user's criterion is one :func:`register` call::

    def theta_sq_abs_g(params, g, hg, flags):   # θ² · |g|
        return theta_map(lambda t, v: t * t * jnp.abs(v), params, g, flags)

    register(Criterion("theta_sq_g", "lowest", "gradient", theta_sq_abs_g))

A score is only half of a criterion: GraSP removes its *highest* scores, the
others their lowest. A default direction silently inverts whichever criterion
it does not fit, so every selection asks for the direction explicitly, either
as ``direction=`` or through a criterion name that implies it.

Before 0.3 the direction keyword was ``prune=``, the name of the function that
takes it; it still works for one release with a
:class:`~grasp_jax.GraspJaxDeprecationWarning` (:func:`direction_keyword`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal

import jax.numpy as jnp

from grasp_jax._deprecation import GraspJaxDeprecationWarning
from grasp_jax.prunable import scatter_prunable, split_prunable

PyTree = Any
Direction = Literal["highest", "lowest"]
Needs = Literal["none", "gradient", "hvp"]
# from_sums(params, g, hg, flags) -> scores: g and hg shaped like params (hg None when the
# criterion needs only g), flags the prunable leaves; zeros at the other leaves.
FromSums = Callable[[PyTree, PyTree, "PyTree | None", tuple], PyTree]

__all__ = [
    "CRITERIA", "PRUNE_DIRECTION", "Criterion", "Direction", "FromSums", "Needs",
    "direction_keyword", "get", "grasp_abs_from_sums", "grasp_from_sums", "register",
    "resolve_direction", "snip_from_sums", "theta_map",
]


@dataclasses.dataclass(frozen=True)
class Criterion:
    """One pruning criterion.

    Attributes:
      name: its name in :data:`CRITERIA` (and ``criterion=`` of the selections).
      direction: the end of the ranking removed, ``"highest"`` or ``"lowest"``.
      needs: what it needs from the data: ``"none"`` (data-free: SynFlow,
        magnitude, random, scored by their own functions), ``"gradient"`` (g =
        Σ_c ∇_θ L_c, one pass) or ``"hvp"`` (g, then Hg = Σ_c ∇²_θθ L_c · g:
        two passes).
      from_sums: ``from_sums(params, g, hg, flags) -> scores`` (None when needs
        is ``"none"``). It runs under ``jit`` with ``flags`` and itself static,
        so it must be a hashable function of arrays (a module-level one), and
        ``hg`` is None for a ``"gradient"`` criterion. :func:`theta_map` writes
        the usual per-weight products.
    """

    name: str
    direction: Direction
    needs: Needs
    from_sums: FromSums | None = None

    def __post_init__(self) -> None:
        if self.direction not in ("highest", "lowest"):
            raise ValueError(f"criterion {self.name!r}: direction must be 'highest' or "
                             f"'lowest', got {self.direction!r}")
        if self.needs not in ("none", "gradient", "hvp"):
            raise ValueError(f"criterion {self.name!r}: needs must be 'none', 'gradient' or "
                             f"'hvp', got {self.needs!r}")
        if (self.from_sums is None) != (self.needs == "none"):
            raise ValueError(f"criterion {self.name!r}: from_sums is required exactly when "
                             f"it needs data (needs={self.needs!r})")


def theta_map(fn: Callable, params: PyTree, values: PyTree, flags: tuple) -> PyTree:
    """``fn(θ, v)`` at each prunable leaf (``flags``) of ``params`` and ``values``, zeros
    elsewhere: the shape of most ``from_sums``."""
    theta, _, _ = split_prunable(params, flags)
    v, _, _ = split_prunable(values, flags)
    return scatter_prunable([fn(t, x) for t, x in zip(theta, v)], params, flags)


def _neg_product(t, v):
    return -t * v


def _abs_product(t, v):
    return jnp.abs(t * v)


def grasp_from_sums(params: PyTree, g: PyTree, hg: PyTree, flags: tuple) -> PyTree:
    """GraSP (Wang, Zhang & Grosse, 2020, eq. 8): S(-θ) = -θ ⊙ Hg."""
    return theta_map(_neg_product, params, hg, flags)


def grasp_abs_from_sums(params: PyTree, g: PyTree, hg: PyTree, flags: tuple) -> PyTree:
    """Gradient-norm preservation (Lubana & Dick, 2021): |θ ⊙ Hg|."""
    return theta_map(_abs_product, params, hg, flags)


def snip_from_sums(params: PyTree, g: PyTree, hg: PyTree | None, flags: tuple) -> PyTree:
    """SNIP (Lee, Ajanthan & Torr, 2019): |θ ⊙ g|."""
    return theta_map(_abs_product, params, g, flags)


_CRITERIA: dict[str, Criterion] = {}

# name -> Criterion, read-only: :func:`register` adds to it.
CRITERIA: Mapping[str, Criterion] = MappingProxyType(_CRITERIA)


class _DirectionView(Mapping):
    """name -> direction of every registered criterion, read-only and always current."""

    def __getitem__(self, name: str) -> Direction:
        return _CRITERIA[name].direction

    def __iter__(self):
        return iter(_CRITERIA)

    def __len__(self) -> int:
        return len(_CRITERIA)

    def __repr__(self) -> str:
        return repr(dict(self))


# Which end of each criterion's ranking is removed: a view of :data:`CRITERIA`.
PRUNE_DIRECTION: Mapping[str, Direction] = _DirectionView()


def register(criterion: Criterion) -> Criterion:
    """Add ``criterion`` to :data:`CRITERIA` (a ValueError if its name is taken)."""
    if criterion.name in _CRITERIA:
        raise ValueError(f"a criterion named {criterion.name!r} is already registered")
    _CRITERIA[criterion.name] = criterion
    return criterion


def get(criterion: Criterion | str) -> Criterion:
    """``criterion`` itself, or the entry of :data:`CRITERIA` it names."""
    if isinstance(criterion, Criterion):
        return criterion
    if criterion not in _CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; known: {sorted(_CRITERIA)}")
    return _CRITERIA[criterion]


# removing the highest S(-θ) reduces gradient flow least
register(Criterion("grasp", "highest", "hvp", grasp_from_sums))
# removing the lowest |θ⊙Hg| changes gradient flow least
register(Criterion("grasp_abs", "lowest", "hvp", grasp_abs_from_sums))
register(Criterion("snip", "lowest", "gradient", snip_from_sums))
register(Criterion("synflow", "lowest", "none"))
register(Criterion("magnitude", "lowest", "none"))
register(Criterion("random", "lowest", "none"))


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
