"""How many weights each prunable layer loses: the sparsity and its split over layers.

``masks_from_scores(scope=...)`` either ranks all prunable weights together
(``"global"``, the paper) or first fixes each layer's budget and then ranks
within each layer:

- ``"layerwise"`` / ``"uniform"`` (the same): every layer loses the same
  fraction, round(s · N_l) of its N_l weights.
- ``"erk"``, Erdős–Rényi-Kernel (Evci et al., 2020, RigL; as in jaxpruner):
  layer l keeps a density d_l = ε · (Σ_i n_i) / (Π_i n_i) over its kernel's
  dims n_i, e.g. (kh + kw + in + out) / (kh · kw · in · out) for a conv, so
  small and thin layers stay denser. ε is chosen so that Σ_l d_l N_l = (1 - s) N;
  a layer whose d_l would exceed 1 is kept dense and ε is solved again for the
  others (the densest first, one at a time, until none exceeds 1). The
  removal counts (1 - d_l) N_l are rounded so that they sum to exactly
  round(s · N), the fractional parts deciding who rounds up.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

SCOPES: tuple[str, ...] = ("global", "layerwise", "uniform", "erk")

__all__ = ["SCOPES", "check_sparsity", "erk_densities", "layer_removal_counts", "num_to_prune"]


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` as a float; a ValueError naming it unless it is a real number (a
    Python or NumPy int or float, or a 0-d real array: not a string, which ``float``
    would parse, nor a bool) in [0, 1)."""
    dtype = getattr(sparsity, "dtype", None)
    if isinstance(sparsity, (bool, np.bool_)) or not (
            isinstance(sparsity, numbers.Real) or (
                dtype is not None and np.shape(sparsity) == ()
                and (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)))):
        raise ValueError(f"sparsity must be a real number in [0, 1), got {sparsity!r} "
                        f"({type(sparsity).__name__})")
    s = float(sparsity)
    if not 0.0 <= s < 1.0:  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return s


def num_to_prune(sparsity: float, size: int) -> int:
    """round(sparsity × size), halves rounded up, so the count is the same everywhere."""
    return math.floor(sparsity * size + 0.5)


def erk_densities(shapes: Sequence[tuple[int, ...]], sparsity: float) -> list[float]:
    """Per-layer densities d_l ∝ (sum of dims)/(product of dims), dense where that exceeds 1.

    The result keeps (1 - sparsity) of all weights in total (up to float
    rounding); see the module docstring.
    """
    sparsity = check_sparsity(sparsity)
    sizes = [math.prod(shape) for shape in shapes]
    if not sizes or min(sizes) == 0:
        raise ValueError(f"erk_densities needs non-empty layer shapes, got {list(shapes)}")
    raw = [sum(shape) / size for shape, size in zip(shapes, sizes)]
    target_kept = (1.0 - sparsity) * sum(sizes)
    dense: set[int] = set()
    eps = 0.0
    while len(dense) < len(sizes):
        free = [layer for layer in range(len(sizes)) if layer not in dense]
        budget = target_kept - sum(sizes[layer] for layer in dense)
        eps = budget / sum(raw[layer] * sizes[layer] for layer in free)
        over = [layer for layer in free if eps * raw[layer] > 1.0]
        if not over:
            break
        # Only the densest layer is settled per pass: making it dense lowers ε,
        # which may bring the others back under 1.
        dense.add(max(over, key=lambda layer: raw[layer]))
    return [1.0 if layer in dense else eps * raw[layer] for layer in range(len(sizes))]


def apportion(
    real: Sequence[float], total: int, lower: Sequence[int], upper: Sequence[int]
) -> list[int]:
    """Integers c_l with Σ c_l = ``total``, lower_l ≤ c_l ≤ upper_l, close to ``real``.

    Start from max(floor(real_l), lower_l) and hand the remainder out one at a
    time by largest fractional part (ties: earlier layer first).
    """
    real = np.asarray(real, np.float64)
    lower, upper = np.asarray(lower, np.int64), np.asarray(upper, np.int64)
    counts = np.minimum(np.maximum(np.floor(real).astype(np.int64), lower), upper)
    rest = total - int(counts.sum())
    if rest < 0:
        raise ValueError(
            f"the current masks already prune {int(lower.sum()):,} weights, more than the "
            f"{total:,} the requested sparsity allows here; sparsity can only grow"
        )
    order = np.argsort(-(real - np.floor(real)), kind="stable")
    while rest > 0:
        open_layers = [layer for layer in order if counts[layer] < upper[layer]]
        if not open_layers:
            raise ValueError(f"cannot place {total:,} removals within the layers' sizes")
        for layer in open_layers[:rest]:
            counts[layer] += 1
        rest -= min(rest, len(open_layers))
    return [int(c) for c in counts]


def layer_removal_counts(
    shapes: Sequence[tuple[int, ...]],
    sparsity: float,
    scope: str,
    *,
    already_removed: Sequence[int] | None = None,
) -> list[int]:
    """How many weights each layer loses under a per-layer ``scope``.

    ``"layerwise"``/``"uniform"``: round(s · N_l) each. ``"erk"``: from
    :func:`erk_densities`, summing to exactly round(s · N); with
    ``already_removed`` (iterative pruning) no layer gets fewer than it has
    already lost, so the rounds only ever add weights to the masks.
    """
    sparsity = check_sparsity(sparsity)
    sizes = [math.prod(shape) for shape in shapes]
    if scope in ("layerwise", "uniform"):
        return [num_to_prune(sparsity, size) for size in sizes]
    if scope != "erk":
        raise ValueError(f"per-layer scope must be 'layerwise', 'uniform' or 'erk', got {scope!r}")
    densities = erk_densities(shapes, sparsity)
    lower = [0] * len(sizes) if already_removed is None else list(already_removed)
    # A layer ERK keeps dense stays so (beyond what is already pruned in it).
    upper = [low if d >= 1.0 else size for d, size, low in zip(densities, sizes, lower)]
    real = [(1.0 - d) * size for d, size in zip(densities, sizes)]
    return apportion(real, num_to_prune(sparsity, sum(sizes)), lower, upper)
