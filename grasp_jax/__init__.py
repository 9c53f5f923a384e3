"""grasp_jax: pruning at initialization (GraSP and baselines) in JAX.

The core (this namespace) works on any params pytree and any loss; it knows
nothing of models, data or training, which live in ``grasp_jax.models``,
``grasp_jax.data`` and ``experiments``.

The top level holds what a user calls: the scores of each criterion (in memory
and over a stream of batches), masks from scores, iterative pruning, the optax
transform that keeps pruned weights at zero, diagnostics and sparse export.
The building blocks behind them live in public submodules, each with its own
``__all__``, as optax keeps its losses and schedules in submodules:

- ``grasp_jax.scoring``, ``grasp_jax.streaming``: every score function and the
  finishers from g or Hg (``from_sums``, ``grasp_from_hvp``, ``snip_from_gradient``),
  ``gradient_from_batches``, ``gradient_and_hvp_from_batches``;
- ``grasp_jax.accumulate``, ``grasp_jax.chunks``: Σ_c ∇L_c and Σ_c ∇²L_c · v,
  chunk layouts, the memory budget;
- ``grasp_jax.prunable``: which leaves are θ, their names, split and merge;
- ``grasp_jax.criteria``: every criterion as one entry (direction, what it
  needs from the data, its scores from g and Hg), ``register`` for new ones;
- ``grasp_jax.masks``, ``grasp_jax.budgets``, ``grasp_jax.structured``,
  ``grasp_jax.selection``: the report's types, per-layer budgets (ERK), N:M;
- ``grasp_jax.pruning``, ``grasp_jax.optim``, ``grasp_jax.export``,
  ``grasp_jax.diagnostics``, ``grasp_jax.ablations``;
- ``grasp_jax.nnx``: the same API for Flax NNX modules (imported on first use).

Names that left the top level in 0.3 still resolve here for one release, with
a :class:`GraspJaxDeprecationWarning` naming their new home.
"""

# The public submodules, re-exported so that gj.chunks.ChunkLayout works after
# `import grasp_jax as gj` (the "x as x" form marks each as exported).
from grasp_jax import ablations as ablations
from grasp_jax import accumulate as accumulate
from grasp_jax import budgets as budgets
from grasp_jax import chunks as chunks
from grasp_jax import criteria as criteria
from grasp_jax import diagnostics as diagnostics
from grasp_jax import export as export
from grasp_jax import masks as masks
from grasp_jax import optim as optim
from grasp_jax import prunable as prunable
from grasp_jax import pruning as pruning
from grasp_jax import scoring as scoring
from grasp_jax import selection as selection
from grasp_jax import streaming as streaming
from grasp_jax import structured as structured
from grasp_jax._deprecation import GraspJaxDeprecationWarning
from grasp_jax.diagnostics import gradient_flow
from grasp_jax.export import load_sparse, save_sparse
from grasp_jax.masks import (
    LayerCollapseWarning,
    TieWarning,
    apply_masks,
    masks_from_scores,
    sparsity_report,
)
from grasp_jax.optim import masked_updates
from grasp_jax.pruning import prune
from grasp_jax.scoring import (
    cross_entropy_with_temperature,
    gradient_and_hvp,
    grasp_abs_scores,
    grasp_scores,
    magnitude_scores,
    random_scores,
    scores,
    snip_scores,
    synflow_scores,
)
from grasp_jax.streaming import (
    grasp_abs_scores_from_batches,
    grasp_scores_from_batches,
    scores_from_batches,
    snip_scores_from_batches,
)
from grasp_jax.structured import nm_masks

__version__ = "0.3.0"

__all__ = [
    # The scores of any data-dependent criterion (grasp_jax.criteria.CRITERIA), in
    # memory and over a stream, and of each criterion by name.
    "scores",
    "scores_from_batches",
    "grasp_scores",
    "grasp_abs_scores",
    "snip_scores",
    "synflow_scores",
    "magnitude_scores",
    "random_scores",
    "grasp_scores_from_batches",
    "grasp_abs_scores_from_batches",
    "snip_scores_from_batches",
    "gradient_and_hvp",
    "cross_entropy_with_temperature",
    # From scores to masks, and masks onto params and training.
    "masks_from_scores",
    "nm_masks",
    "prune",
    "apply_masks",
    "sparsity_report",
    "masked_updates",
    # What the masks leave, and the pruned network as a file.
    "gradient_flow",
    "save_sparse",
    "load_sparse",
    # Warnings a user may filter.
    "LayerCollapseWarning",
    "TieWarning",
    "GraspJaxDeprecationWarning",
]

# Old top-level names (before 0.3) -> the submodule that is now their one home.
# They resolve through __getattr__ below, with a warning, for one release.
_MOVED_IN_0_3: dict[str, str] = {
    "ChunkLayout": "chunks",
    "chunk_layout": "chunks",
    "split_microbatches": "chunks",
    "accumulate_gradient": "accumulate",
    "accumulate_hvp": "accumulate",
    "default_memory_budget": "accumulate",
    "gradient_from_batches": "streaming",
    "gradient_and_hvp_from_batches": "streaming",
    "grasp_from_hvp": "scoring",
    "snip_from_gradient": "scoring",
    "default_is_prunable": "prunable",
    "merge_prunable": "prunable",
    "path_name": "prunable",
    "prunable_flags": "prunable",
    "split_prunable": "prunable",
    "PRUNE_DIRECTION": "criteria",
    "resolve_direction": "criteria",
    "erk_densities": "budgets",
    "LayerDensity": "masks",
    "SparsityReport": "masks",
    "MaskedUpdatesState": "optim",
    "sparsity_schedule": "pruning",
    "load_sparse_masks": "export",
    "inverted_direction": "ablations",
    "inverted_masks": "ablations",
    "reinitialized": "ablations",
    "shuffle_masks": "ablations",
}


def __getattr__(name: str):
    import importlib

    # gj.nnx (the API for Flax NNX modules) imports flax, which the rest of the
    # core does not need: load it on first use.
    if name == "nnx":
        return importlib.import_module("grasp_jax.nnx")
    if name in _MOVED_IN_0_3:
        import warnings

        home = f"grasp_jax.{_MOVED_IN_0_3[name]}"
        warnings.warn(
            f"grasp_jax.{name} is deprecated since grasp_jax 0.3.0 and goes in 0.4.0: "
            f"use {home}.{name}",
            GraspJaxDeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(home), name)
    raise AttributeError(f"module 'grasp_jax' has no attribute {name!r}")
