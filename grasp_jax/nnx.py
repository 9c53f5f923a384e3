"""The pruning API for Flax NNX modules: score, mask and train in three lines.

::

    scores = gj.nnx.grasp_scores(model, loss_fn, batch)          # loss_fn(model, batch)
    masks = gj.masks_from_scores(scores, 0.9, direction="highest")
    gj.nnx.apply_masks(model, masks)
    optimizer = nnx.Optimizer(model, optax.chain(tx, gj.masked_updates(masks)), wrt=nnx.Param)

Each scoring function here is the functional one of the same name
(:func:`grasp_jax.grasp_scores`, ...) applied to the module's ``nnx.Param``
state, so the scores, and the masks made from them, have exactly the structure
of ``nnx.state(model, nnx.Param)``: what ``nnx.Optimizer(..., wrt=nnx.Param)``
hands to the optax chain. Everything that is not an ``nnx.Param`` (BatchNorm
statistics, rng keys and counts) is held fixed while scoring.

Scoring never changes the module: the loss runs on a copy merged inside the
trace from the module's state (which is also what a BatchNorm in training mode
needs, since it writes its running averages while it runs), with the modes set
on the copy, and the copy is thrown away. The running averages, rng counts and
the module's own ``train()``/``eval()`` settings are as they were.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
from flax import nnx

from grasp_jax import masks as masks_lib
from grasp_jax import pruning as pruning_lib
from grasp_jax import scoring as scoring_lib
from grasp_jax.prunable import PrunableSpec, prunable_flags

PyTree = Any
ModuleLossFn = Callable[[nnx.Module, PyTree], jax.Array]
BatchNormMode = Literal["train", "eval"]
DropoutRngs = Any  # nnx.Rngs | jax.Array | int | None

__all__ = [
    "apply_masks", "grasp_scores", "magnitude_scores", "prune", "random_scores", "snip_scores",
    "synflow_scores",
]


# --------------------------------------------------------------------------
# The module as data: (params, rest[, dropout key]), and back to a module.


def _prepare(model: nnx.Module, rngs) -> tuple[nnx.GraphDef, tuple]:
    """The module's graph and its state as one pytree: (params, rest[, key])."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, (params, rest) if rngs is None else (params, rest, _dropout_key(rngs))


def _dropout_key(rngs) -> jax.Array:
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout()  # the 'dropout' stream, or 'default' where there is none
    if isinstance(rngs, int):
        return jax.random.key(rngs)
    if isinstance(rngs, jax.Array):
        return rngs
    raise TypeError(f"rngs must be None, an nnx.Rngs, a jax.random key or an int, got {rngs!r}")


def _flags_tree(tree: tuple, prunable: PrunableSpec) -> tuple:
    """A bool per leaf of ``tree``: ``prunable`` over the params, False for the rest."""
    params, *others = tree
    flags = prunable_flags(params, prunable)
    flags_params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), flags)
    return (flags_params, *(jax.tree_util.tree_map(lambda _: False, o) for o in others))


def _module_copy(graphdef: nnx.GraphDef, tree: tuple, *, train: bool, dropout: bool) -> nnx.Module:
    """A throwaway module from ``tree`` with BatchNorm and Dropout modes set on it.

    ``tree`` reaches the loss as traced data, and ``tree_map`` gives the copy
    Variables of its own at the current trace level, so a BatchNorm in
    training mode writes its running averages only into them. (A loss that
    merges state captured from outside the trace fails there with Flax's
    TraceContextError.)
    """
    params, rest, *key = jax.tree_util.tree_map(lambda x: x, tree)
    model = nnx.merge(graphdef, params, rest)
    model.set_attributes(use_running_average=not train, deterministic=not dropout,
                         raise_if_not_found=False)
    if dropout:
        # Each Dropout draws from its own fold of the one key, so layers are
        # independent and the draw does not depend on the module's rng counts.
        for i, (_, module) in enumerate(nnx.iter_modules(model)):
            if isinstance(module, nnx.Dropout):
                module.rngs = nnx.RngStream(jax.random.fold_in(key[0], i), tag="dropout")
    return model


@functools.lru_cache(maxsize=128)
def _tree_loss(loss_fn: ModuleLossFn, graphdef: nnx.GraphDef, train: bool, dropout: bool):
    """``loss_fn(model, batch)`` as the functional API's ``loss(tree, batch)``.

    Cached on its arguments so that the same loss on the same module structure
    is the same function object, which the functional API's jit caches on.
    """

    def loss(tree, batch):
        return loss_fn(_module_copy(graphdef, tree, train=train, dropout=dropout), batch)

    return loss


@functools.lru_cache(maxsize=128)
def _tree_forward(graphdef: nnx.GraphDef, forward: Callable | None):
    def apply(tree, x):
        model = _module_copy(graphdef, tree, train=False, dropout=False)
        return model(x) if forward is None else forward(model, x)

    return apply


def _train_flag(batch_norm: BatchNormMode) -> bool:
    if batch_norm not in ("train", "eval"):
        raise ValueError(f"batch_norm must be 'train' or 'eval', got {batch_norm!r}")
    return batch_norm == "train"


def _data_scores(score_fn, model, loss_fn, batch, prunable, batch_norm, rngs, options) -> nnx.State:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    graphdef, tree = _prepare(model, rngs)
    loss = _tree_loss(loss_fn, graphdef, _train_flag(batch_norm), rngs is not None)
    return score_fn(tree, loss, batch, prunable=_flags_tree(tree, prunable), **options)[0]


# --------------------------------------------------------------------------
# Public API.


def grasp_scores(model: nnx.Module, loss_fn: ModuleLossFn, batch: PyTree, *,
                 prunable: PrunableSpec = None, batch_norm: BatchNormMode = "train",
                 rngs: DropoutRngs = None, **options: Any) -> nnx.State:
    """GraSP's S(-θ) = -θ ⊙ Hg for every prunable ``nnx.Param`` of ``model``.

    :func:`grasp_jax.grasp_scores` on ``nnx.state(model, nnx.Param)``, with
    every other Variable held fixed. GraSP prunes the **highest** scores.

    Args:
      model: the module at initialization; it is not changed.
      loss_fn: ``loss_fn(model, batch) -> scalar``, the mean loss of one
        (micro)batch, called with a copy of ``model`` (put the paper's
        temperature here: :func:`grasp_jax.cross_entropy_with_temperature`).
        Pass the same function object to reuse the compiled computation.
      batch: a pytree of arrays sharing a leading axis.
      prunable: which ``nnx.Param`` leaves are θ, as in the functional API
        (default: ``kernel`` leaves with ndim >= 2).
      batch_norm: ``"train"`` (default, the authors': their scoring copy of
        the net is in ``train()`` mode, so BatchNorm normalizes with the
        statistics of each chunk) or ``"eval"`` (running averages, as
        Synaptic-Flow's code scores every method). Set on every submodule
        with a ``use_running_average`` attribute, whatever ``model`` is set to.
      rngs: Dropout. ``None`` (default): every submodule with a
        ``deterministic`` attribute is made deterministic while scoring. An
        ``nnx.Rngs`` (its ``dropout`` stream is drawn once), a key or an int:
        Dropout is active, as under PyTorch's ``model.train()``, each
        ``nnx.Dropout`` drawing from its own fold of that key; the same masks
        serve g and Hg, and every chunk.
      **options: any other keyword of :func:`grasp_jax.grasp_scores`
        (``num_microbatches``, ``axis_name``, ``matmul_precision``: float32
        matmuls and convolutions on every backend unless ``None``, ...).

    Dropout is off by default, although the authors' code scores with the
    network in ``train()`` mode: their networks (VGG, ResNet) have no Dropout,
    so that code never made the choice, and with Dropout on the scores are
    those of one randomly thinned network, changing with the key. Pass
    ``rngs`` to score as PyTorch's ``model.train()`` would.

    Returns:
      An ``nnx.State`` like ``nnx.state(model, nnx.Param)``: scores at
      prunable leaves, zeros elsewhere.
    """
    return _data_scores(scoring_lib.grasp_scores, model, loss_fn, batch, prunable, batch_norm, rngs,
                        options)


def snip_scores(model: nnx.Module, loss_fn: ModuleLossFn, batch: PyTree, *,
                prunable: PrunableSpec = None, batch_norm: BatchNormMode = "train",
                rngs: DropoutRngs = None, **options: Any) -> nnx.State:
    """SNIP's |θ ⊙ g| for every prunable ``nnx.Param``; SNIP prunes the **lowest**.

    :func:`grasp_jax.snip_scores` on the module; every argument as in
    :func:`grasp_scores`.
    """
    return _data_scores(scoring_lib.snip_scores, model, loss_fn, batch, prunable, batch_norm, rngs,
                        options)


def synflow_scores(
    model: nnx.Module,
    input_shape: Sequence[int],
    *,
    forward: Callable[[nnx.Module, jax.Array], jax.Array] | None = None,
    prunable: PrunableSpec = None,
    rescale: bool = True,
) -> nnx.State:
    """SynFlow's |θ ⊙ ∂R/∂θ|, R = 1ᵀ f(1; |θ|), data-free; prune the **lowest**.

    :func:`grasp_jax.synflow_scores` on the module, run in evaluation mode
    (BatchNorm on its running averages, Dropout off: batch statistics would
    normalize the all-ones input away). ``forward(model, x)`` calls the
    module (default ``model(x)``); ``input_shape`` is one example's shape,
    without the batch axis. Every float Variable is taken by absolute value,
    the running averages too, as Synaptic-Flow's ``linearize`` does over the
    whole ``state_dict`` (at initialization, mean 0 and variance 1, this
    changes nothing). For iterative SynFlow use :func:`prune`.
    """
    graphdef, tree = _prepare(model, None)
    apply_fn = _tree_forward(graphdef, forward)
    flags = _flags_tree(tree, prunable)
    return scoring_lib.synflow_scores(tree, apply_fn, input_shape, prunable=flags,
                                      rescale=rescale)[0]


def magnitude_scores(model: nnx.Module, *, prunable: PrunableSpec = None) -> nnx.State:
    """|θ| for every prunable ``nnx.Param``; magnitude pruning removes the **lowest**."""
    return scoring_lib.magnitude_scores(nnx.state(model, nnx.Param), prunable=prunable)


def random_scores(model: nnx.Module, key: jax.Array, *, prunable: PrunableSpec = None) -> nnx.State:
    """Uniform random scores for every prunable ``nnx.Param``."""
    return scoring_lib.random_scores(nnx.state(model, nnx.Param), key, prunable=prunable)


def apply_masks(model: nnx.Module, masks: nnx.State) -> None:
    """Zero the pruned weights of ``model`` in place: θ ← θ ⊙ m for every ``nnx.Param``.

    ``masks`` has the structure of ``nnx.state(model, nnx.Param)`` (as every
    scoring function here returns); a ValueError names any difference. Keep
    them at zero while training with :func:`grasp_jax.masked_updates` last in
    the optax chain given to ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.
    """
    nnx.update(model, masks_lib.apply_masks(nnx.state(model, nnx.Param), masks))


def prune(
    model: nnx.Module,
    score_fn: Callable[[nnx.Module], nnx.State],
    sparsity: float,
    **options: Any,
) -> nnx.State:
    """Masks from one or more rounds of scoring the masked module, as :func:`grasp_jax.prune`.

    ``score_fn(model) -> scores`` is called on a copy of ``model`` with the
    weights pruned so far set to 0, e.g. for 100 rounds of SynFlow::

        masks = gj.nnx.prune(model, lambda m: gj.nnx.synflow_scores(m, (28, 28, 1)),
                             0.99, direction="lowest", rounds=100)

    ``options`` are those of :func:`grasp_jax.prune` (the direction, ``rounds``,
    ``schedule``, ``scope``, ``prunable``, ``callback``). ``model`` is not
    changed; apply the masks with :func:`apply_masks`.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def score_params(p: nnx.State) -> nnx.State:
        return score_fn(nnx.merge(graphdef, p, rest, copy=True))

    return pruning_lib.prune(params, score_params, sparsity, **options)
