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
from experiments import distributed
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
    running averages thrown away, logits divided by ``temperature``. A batch
    with a ``weight`` entry (data-parallel scoring: 1 in real chunks, 0 in a
    device's padding chunks) has its loss multiplied by the chunk's weight."""

    def loss_fn(params, batch):
        logits, _ = model.apply(
            {"params": params, "batch_stats": batch_stats}, batch["image"], train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_key},
        )
        loss = gj.cross_entropy_with_temperature(logits, batch["label"], temperature)
        if "weight" in batch:
            loss = loss * jnp.mean(batch["weight"])
        return loss

    return loss_fn


# The pmap axis of data-parallel scoring.
SCORE_AXIS = "score"


def chunks_per_device(num_chunks: int, num_devices: int) -> int:
    """⌈num_chunks / num_devices⌉: the chunk slots every device scores (some may be padding)."""
    return -(-num_chunks // num_devices)


def deal_chunks(batch: dict[str, np.ndarray], num_chunks: int,
                num_devices: int) -> dict[str, np.ndarray]:
    """The scoring batch's ``num_chunks`` equal chunks dealt to ``num_devices``.

    Device d gets chunks d*c .. d*c + c - 1, with c = ceil(num_chunks /
    num_devices), so every chunk is scored whole, by one device, and stays its
    own BatchNorm batch whatever the device count. Slots past the last chunk
    repeat an earlier chunk with ``weight`` 0, so that every device runs the
    same program and the padding adds exactly nothing.

    Returns:
      Every entry of ``batch`` as ``[num_devices, c * chunk, ...]``, and
      ``weight`` ``[num_devices, c * chunk]`` float32.
    """
    size = len(batch["label"]) // num_chunks
    if size * num_chunks != len(batch["label"]):
        raise ValueError(f"{len(batch['label'])} scoring images do not split into "
                         f"{num_chunks} equal chunks")
    per_device = chunks_per_device(num_chunks, num_devices)
    slots = np.arange(num_devices * per_device)
    out = {}
    for k, v in batch.items():
        chunks = np.asarray(v).reshape((num_chunks, size) + v.shape[1:])[slots % num_chunks]
        out[k] = chunks.reshape((num_devices, per_device * size) + v.shape[1:])
    weight = np.repeat((slots < num_chunks).astype(np.float32), size)
    out["weight"] = weight.reshape(num_devices, per_device * size)
    return out


def data_parallel_scorer(scorer: Callable[..., PyTree], loss_fn: Callable, batch: dict[str, np.ndarray],
                         num_chunks: int) -> Callable[[PyTree], PyTree]:
    """``params -> scores`` of ``scorer`` (grasp_scores or snip_scores) over
    every device of every process.

    Each process puts the chunks of its own devices on them (their positions
    in ``jax.devices()``, the same list on every process); the core sums g and
    Hg across all devices, so every device of every process ends with the
    scores of the whole batch.
    """
    devices = jax.devices()
    dealt = deal_chunks(batch, num_chunks, len(devices))
    rows = [devices.index(d) for d in jax.local_devices()]
    local = {k: v[rows] for k, v in dealt.items()}
    per_device = chunks_per_device(num_chunks, len(devices))

    def score(params, chunks):
        return scorer(params, loss_fn, chunks, num_microbatches=per_device, axis_name=SCORE_AXIS)

    p_score = jax.pmap(score, axis_name=SCORE_AXIS, in_axes=(None, 0))

    def score_fn(params: PyTree) -> PyTree:
        # Every device holds the same scores; read this process's first one.
        return distributed.first_replica(p_score(params, local))

    return score_fn


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
        loss_fn = make_loss_fn(model, batch_stats, config.temperature, key)
        scorer = gj.grasp_scores if config.method == "grasp" else gj.snip_scores
        k = config.num_score_microbatches
        if jax.device_count() > 1:
            # Every device scores whole chunks; g and Hg are summed across all of them.
            log(f"  data-parallel: {chunks_per_device(k, jax.device_count())} chunk(s) per device on "
                f"{jax.device_count()} devices")
            scores_of = data_parallel_scorer(scorer, loss_fn, batch, k)
        else:
            # Left in host memory: the core feeds an eager call chunk by chunk, so the
            # device holds one chunk at a time (ImageNet's 19,200 images are 11.6 GB).
            def scores_of(p):
                return scorer(p, loss_fn, batch, num_microbatches=k)

        reinit_key = jax.random.fold_in(key, 1)

        def score_fn(p):
            if config.score_reinit_dense:
                p = reinit_dense_kernels(p, reinit_key)
            return scores_of(p)
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
    # One loss function for both: in training mode BatchNorm normalizes with the
    # batch's own statistics and the running averages only flow out, so they do
    # not change the loss, and one jitted program serves before and after
    # (a second compile cost ~4 s per run on the small VGG, more on VGG19).
    loss_fn = make_loss_fn(model, dense.get("batch_stats", {}), 1.0, key)
    out = {
        "before": gj.gradient_flow(dense["params"], loss_fn, batch),
        "after": gj.gradient_flow(pruned["params"], loss_fn, batch, masks=masks),
        "batch_size": int(len(batch["label"])),
    }
    for when in ("before", "after"):
        f = out[when]
        log(f"gradient flow {when} pruning: loss {f['loss']:.4f}, ||g||^2 {f['grad_norm_sq']:.4e}, "
            f"g^T H g {f['gHg']:.4e}")
    return out
