"""From a config and an initialized network to pruning masks.

Connects the core's scoring functions to a Flax model and the input
pipeline: which data each criterion sees, in which mode BatchNorm runs, and
how many rounds are pruned.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import grasp_jax as gj
from grasp_jax import input_pipeline
from experiments.configs import Config

PyTree = Any


def scoring_batch(config: Config) -> dict[str, np.ndarray]:
    """The data the data-dependent criteria score with, concatenated.

    Class-balanced draws (CIFAR, Tiny-ImageNet, digits) are concatenated draw
    after draw, so that feeding the batch in ``2 * draws`` equal chunks gives
    the reference's two halves of every draw. With ``score_batches`` (ImageNet)
    it is the first training batches of a single-process run instead. Every
    process computes the same batch, hence the same masks.
    """
    if config.score_batches:
        parts = input_pipeline.first_batches(
            config.dataset, config.score_batches, config.score_batch_size,
            seed=config.seed, data_dir=config.data_dir,
        )
    else:
        parts = [
            input_pipeline.scoring_batch(
                config.dataset, samples_per_class=config.score_samples_per_class,
                seed=config.seed, draw=d, data_dir=config.data_dir,
            )
            for d in range(config.score_draws)
        ]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label")}


def make_loss_fn(model: nn.Module, batch_stats: PyTree, temperature: float,
                 dropout_key: jax.Array) -> Callable[[PyTree, PyTree], jax.Array]:
    """``loss(params, batch)`` for scoring: BatchNorm in training mode (each chunk
    normalized by its own statistics, as the reference's ``net.train()``), the
    running averages thrown away, logits divided by ``temperature``."""

    def loss_fn(params, batch):
        logits, _ = model.apply(
            {"params": params, "batch_stats": batch_stats}, batch["image"], train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_key},
        )
        return gj.cross_entropy_with_temperature(logits, batch["label"], temperature)

    return loss_fn


# PyTorch's nn.init.xavier_normal_: an untruncated normal of variance 2 / (fan_in + fan_out).
_xavier_normal = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal")  # untruncated


def reinit_dense_kernels(params: PyTree, key: jax.Array) -> PyTree:
    """A copy of ``params`` whose prunable dense (2-D) kernels are redrawn Xavier-normal.

    The reference GraSP (``reinit=True``, its default) scores a copy of the
    network in which every ``nn.Linear`` weight is re-initialized this way; the
    masks then go to the original network, which trains from its own init.
    Weights that are exactly zero (pruned in an earlier round) stay zero.
    """
    flags = gj.prunable_flags(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = [
        jnp.where(x != 0, _xavier_normal(k, x.shape, x.dtype), 0) if f and x.ndim == 2 else x
        for x, f, k in zip(leaves, flags, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def compute_masks(
    config: Config,
    model: nn.Module,
    variables: PyTree,
    key: jax.Array,
    image_shape: tuple[int, ...],
    log: Callable[[str], None] = print,
) -> PyTree:
    """Boolean keep-masks with the structure of ``variables['params']``.

    ``dense`` keeps everything; the other methods prune ``config.sparsity`` of
    the conv/dense kernels in ``config.rounds`` rounds (one-shot when 1) on
    ``config.prune_schedule``, ranked over ``config.scope``.
    """
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    if config.method == "dense":
        return jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), params)

    start = time.time()
    if config.method in ("grasp", "snip"):
        batch = scoring_batch(config)
        log(f"scoring with {config.method} on {len(batch['label'])} training images in "
            f"{config.num_score_microbatches} chunks (temperature {config.temperature:g}"
            f"{', dense layers re-initialized Xavier-normal' if config.score_reinit_dense else ''})")
        # Left in host memory: the core feeds an eager call chunk by chunk, so the
        # device holds one chunk at a time (ImageNet's 19,200 images are 11.6 GB).
        loss_fn = make_loss_fn(model, batch_stats, config.temperature, key)
        scorer = gj.grasp_scores if config.method == "grasp" else gj.snip_scores

        reinit_key = jax.random.fold_in(key, 1)

        def score_fn(p):
            if config.score_reinit_dense:
                p = reinit_dense_kernels(p, reinit_key)
            return scorer(p, loss_fn, batch, num_microbatches=config.num_score_microbatches)
    elif config.method == "synflow":
        def apply_fn(p, x):
            # Inference mode: batch statistics would normalize the all-ones input away.
            return model.apply({"params": p, "batch_stats": batch_stats}, x, train=False)

        def score_fn(p):
            return gj.synflow_scores(p, apply_fn, image_shape)
    elif config.method == "magnitude":
        score_fn = gj.magnitude_scores
    elif config.method == "random":
        def score_fn(p):
            return gj.random_scores(p, key)
    else:
        raise ValueError(f"unknown method {config.method!r}")

    every = max(1, config.rounds // 10)

    def progress(r: int, s: float, _masks: PyTree) -> None:
        if config.rounds > 1 and (r % every == 0 or r == config.rounds):
            log(f"  round {r}/{config.rounds}: sparsity {s:.4%}")

    direction = gj.PRUNE_DIRECTION[config.method]
    if config.ablation == "invert":
        # Keep what the method would prune first, as many as it would keep.
        direction = "lowest" if direction == "highest" else "highest"
    masks = gj.prune(
        params, score_fn, config.sparsity, prune=direction,
        rounds=config.rounds, schedule=config.prune_schedule, scope=config.scope,
        callback=progress,
    )
    if config.ablation == "shuffle":
        masks = gj.shuffle_masks(masks, jax.random.fold_in(key, 2))
    masks = jax.block_until_ready(masks)
    log(f"pruned with {config.method}{_ablation_note(config)} in {time.time() - start:.1f}s")
    return masks


def _ablation_note(config: Config) -> str:
    return "" if config.ablation == "none" else f" (ablation: {config.ablation})"


def diagnostics_batch(config: Config) -> dict[str, np.ndarray]:
    """One training batch that is not the scoring batch: another seed's first batch."""
    (batch,) = input_pipeline.first_batches(
        config.dataset, 1, config.batch_size, seed=config.seed + 7919, data_dir=config.data_dir)
    return batch


def gradient_flow_report(config: Config, model: nn.Module, dense: PyTree, pruned: PyTree,
                         masks: PyTree, key: jax.Array,
                         log: Callable[[str], None] = print) -> dict[str, dict]:
    """Loss, ‖g‖² and gᵀHg at initialization, before and after pruning.

    ``before`` is the dense network at its initialization (``dense``
    variables); ``after`` the network training starts from: ``pruned``
    variables (the same, or a fresh draw for the reinit ablation) under
    ``masks``. Measured on a training batch that is not the scoring batch,
    BatchNorm in training mode, plain cross-entropy (no temperature): the
    quantities GraSP's criterion is about, for any method. See
    :func:`grasp_jax.gradient_flow`.
    """
    batch = diagnostics_batch(config)
    before_loss = make_loss_fn(model, dense.get("batch_stats", {}), 1.0, key)
    after_loss = make_loss_fn(model, pruned.get("batch_stats", {}), 1.0, key)
    out = {
        "before": gj.gradient_flow(dense["params"], before_loss, batch),
        "after": gj.gradient_flow(pruned["params"], after_loss, batch, masks=masks),
        "batch_size": int(len(batch["label"])),
    }
    for when in ("before", "after"):
        f = out[when]
        log(f"gradient flow {when} pruning: loss {f['loss']:.4f}, ||g||^2 {f['grad_norm_sq']:.4e}, "
            f"g^T H g {f['gHg']:.4e}")
    return out
