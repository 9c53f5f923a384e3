"""grasp_jax: pruning at initialization (GraSP and baselines) in JAX.

The core (this namespace) works on any params pytree and any loss; it knows
nothing of models, data or training, which live in ``grasp_jax.models``,
``grasp_jax.data`` and ``experiments``.
"""

from grasp_jax.ablations import (
    inverted_direction,
    inverted_masks,
    reinitialized,
    shuffle_masks,
)
from grasp_jax.accumulate import (
    accumulate_gradient,
    accumulate_hvp,
    default_memory_budget,
)
from grasp_jax.budgets import erk_densities
from grasp_jax.chunks import ChunkLayout, chunk_layout, split_microbatches
from grasp_jax.criteria import resolve_direction
from grasp_jax.diagnostics import gradient_flow
from grasp_jax.export import load_sparse, load_sparse_masks, save_sparse
from grasp_jax.masks import (
    LayerCollapseWarning,
    LayerDensity,
    SparsityReport,
    TieWarning,
    apply_masks,
    masks_from_scores,
    sparsity_report,
)
from grasp_jax.optim import MaskedUpdatesState, masked_updates
from grasp_jax.prunable import (
    default_is_prunable,
    merge_prunable,
    path_name,
    prunable_flags,
    split_prunable,
)
from grasp_jax.pruning import PRUNE_DIRECTION, prune, sparsity_schedule
from grasp_jax.scoring import (
    cross_entropy_with_temperature,
    gradient_and_hvp,
    grasp_abs_scores,
    grasp_from_hvp,
    grasp_scores,
    magnitude_scores,
    random_scores,
    snip_from_gradient,
    snip_scores,
    synflow_scores,
)
from grasp_jax.streaming import (
    gradient_and_hvp_from_batches,
    gradient_from_batches,
    grasp_scores_from_batches,
    snip_scores_from_batches,
)
from grasp_jax.structured import nm_masks

__version__ = "0.2.0"

__all__ = [
    "PRUNE_DIRECTION",
    "ChunkLayout",
    "LayerCollapseWarning",
    "LayerDensity",
    "MaskedUpdatesState",
    "SparsityReport",
    "TieWarning",
    "accumulate_gradient",
    "accumulate_hvp",
    "apply_masks",
    "chunk_layout",
    "cross_entropy_with_temperature",
    "default_is_prunable",
    "default_memory_budget",
    "erk_densities",
    "gradient_and_hvp",
    "gradient_and_hvp_from_batches",
    "gradient_flow",
    "gradient_from_batches",
    "grasp_abs_scores",
    "grasp_from_hvp",
    "grasp_scores",
    "grasp_scores_from_batches",
    "inverted_direction",
    "inverted_masks",
    "load_sparse",
    "load_sparse_masks",
    "magnitude_scores",
    "masked_updates",
    "masks_from_scores",
    "merge_prunable",
    "nm_masks",
    "path_name",
    "prunable_flags",
    "prune",
    "random_scores",
    "reinitialized",
    "resolve_direction",
    "save_sparse",
    "shuffle_masks",
    "snip_from_gradient",
    "snip_scores",
    "snip_scores_from_batches",
    "sparsity_report",
    "sparsity_schedule",
    "split_microbatches",
    "split_prunable",
    "synflow_scores",
]


def __getattr__(name: str):
    # gj.nnx (the API for Flax NNX modules) imports flax, which the rest of the
    # core does not need: load it on first use.
    if name == "nnx":
        import importlib

        return importlib.import_module("grasp_jax.nnx")
    raise AttributeError(f"module 'grasp_jax' has no attribute {name!r}")
