"""The training state and the train/eval steps: pure functions, mapped over devices at the edge.

Data parallelism. The global batch (``config.batch_size``) is split evenly
over every device of every process; each device computes the mean loss and
gradient of its share and the gradients are averaged with ``lax.pmean`` over
the axis ``"batch"``. For networks without BatchNorm this is exactly the
single-device computation, whatever the device count.

BatchNorm. As in the Flax ImageNet example and PyTorch DDP without SyncBN,
each device normalizes with the statistics of its own share of the batch.
The *running* averages are averaged across devices at the end of every step
(one small all-reduce of per-channel vectors, next to the gradient
all-reduce): replicas then never diverge, a checkpoint is simply replica 0,
and a run resumed from any step continues exactly as if it had not stopped.

Precision. ``--compute_dtype bfloat16`` builds the network with ``dtype=bfloat16``
(:func:`training_model`): activations and the inputs of every matmul and
convolution are bfloat16, while the parameters stay float32 (Flax casts a
copy of each kernel to bfloat16 inside the layer), so their gradients, the
optimizer state and the masked updates are float32, BatchNorm reduces and
keeps its statistics in float32, and the logits are cast to float32 before
the softmax cross-entropy. Casting to bfloat16 rounds to nearest, not at
random, so a bfloat16 run is as deterministic, and resumes as exactly, as a
float32 one.

Divergence. Each step reports ``finite``: whether its loss and its gradients
(their global norm, a reduction over values the step already holds) are
finite on every device. The loop stops at the first step where it is not.

Input. Training and evaluation batches arrive as uint8 pixels and are
normalized here, on the device (``pixel_stats``: the dataset's per-channel
mean and std); float batches are taken as already normalized.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import grasp_jax as gj
from grasp_jax import models
from grasp_jax.data.on_device import normalize_pixels
from grasp_jax.prunable import named_leaves

from experiments import config_schema, distributed
from experiments.config_schema import Config

PyTree = Any
PixelStats = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per channel
AXIS = "batch"  # the pmap axis over which the global batch is split


class SparsityDriftError(RuntimeError):
    """A pruned weight is no longer exactly zero."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # number of optimizer steps taken = index of the next batch
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    masks: PyTree  # also inside opt_state's MaskedUpdatesState; kept here for the guard and saving
    rng: jax.Array  # base key of per-step randomness (dropout)

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def learning_rate_schedule(config: Config) -> optax.Schedule:
    """lr, multiplied by ``lr_decay_factor`` from the first step of each decay epoch."""
    return optax.piecewise_constant_schedule(config.lr, config_schema.lr_boundaries(config))


def make_optimizer(config: Config, masks: PyTree) -> optax.GradientTransformation:
    """PyTorch's SGD(momentum, weight_decay), then the masks.

    Weight decay is added to the gradient before momentum (PyTorch's
    ``weight_decay`` argument, as the paper's code used), on every parameter
    as there. ``masked_updates`` comes last so that no part of the update
    (gradient, decay, momentum) can move a pruned weight off zero.
    """
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(learning_rate_schedule(config), momentum=config.momentum),
        gj.masked_updates(masks),
    )


def training_model(config: Config, num_classes: int) -> nn.Module:
    """The network the train and eval steps run: ``config.arch`` computing in
    ``config.compute_dtype``, with float32 parameters (the models' ``param_dtype``)."""
    return models.get_model(config.arch, num_classes, dtype=jnp.dtype(config.compute_dtype))


def init_variables(model: nn.Module, key: jax.Array, image_shape: tuple[int, ...]) -> PyTree:
    """The network's variables at the paper's initialization (the models' own initializers)."""
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init({"params": key, "dropout": key}, x)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def create_state(variables: PyTree, masks: PyTree, tx: optax.GradientTransformation,
                 rng: jax.Array) -> TrainState:
    params = gj.apply_masks(variables["params"], masks)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        masks=jax.tree_util.tree_map(lambda m: jnp.asarray(m, bool), masks), rng=rng,
    )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    # float32 whatever the network computed in: a bfloat16 log-softmax would round the
    # loss, and with it every gradient, to 8 bits of mantissa.
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def input_images(batch: dict, pixel_stats: PixelStats | None) -> jax.Array:
    """The network's float input: uint8 pixels normalized with ``pixel_stats`` (evaluation
    padding, ``mask`` False, zeroed), float images as they are."""
    images = batch["image"]
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    if pixel_stats is None:
        raise ValueError("uint8 images need pixel_stats=(mean, std) to be normalized.")
    return normalize_pixels(images, *pixel_stats, mask=batch.get("mask"))


def train_step(state: TrainState, batch: dict, *, model: nn.Module,
               tx: optax.GradientTransformation, axis_name: str = AXIS,
               pixel_stats: PixelStats | None = None) -> tuple[TrainState, dict]:
    """One SGD step on this device's share of the global batch (call under pmap)."""
    images = input_images(batch, pixel_stats)
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                             jax.lax.axis_index(axis_name))

    def loss_fn(params):
        logits, new_vars = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True,
            mutable=["batch_stats"], rngs={"dropout": key},
        )
        return cross_entropy(logits, batch["label"]).mean(), (logits, new_vars)

    (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # Equal shares per device, so the mean of per-device means is the global mean.
    grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    batch_stats = jax.lax.pmean(new_vars.get("batch_stats", state.batch_stats), axis_name)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    metrics = jax.lax.pmean(metrics, axis_name)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(optax.tree.norm(grads))
    metrics["finite"] = finite.astype(jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, axis_name: str = AXIS,
              pixel_stats: PixelStats | None = None) -> dict:
    """Sums over the real (``mask``) examples of the global batch (call under pmap)."""
    images = input_images(batch, pixel_stats)
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         images, train=False)
    mask = batch["mask"].astype(jnp.float32)
    sums = {
        "loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
        "count": jnp.sum(mask),
    }
    return jax.lax.psum(sums, axis_name)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    pixel_stats: PixelStats | None = None) -> Callable:
    # The state is donated: its buffers are reused for the new state.
    return jax.pmap(functools.partial(train_step, model=model, tx=tx, pixel_stats=pixel_stats),
                    axis_name=AXIS, donate_argnums=(0,))


def make_eval_step(model: nn.Module, pixel_stats: PixelStats | None = None) -> Callable:
    return jax.pmap(functools.partial(eval_step, model=model, pixel_stats=pixel_stats),
                    axis_name=AXIS)


def evaluate(p_eval: Callable, rstate: TrainState, batches) -> dict[str, float]:
    """Test loss and accuracy over device-placed evaluation batches (padding excluded)."""
    totals = None
    for batch in batches:
        if totals is not None:
            # One step at a time. Unlike train steps, eval steps do not depend on each other,
            # so without this wait several run at once; on XLA:CPU with several devices their
            # all-reduces can then take every worker thread while a device of the oldest step
            # waits for one: measured, 2 of 8 four-device CIFAR runs under load deadlocked in
            # evaluation until XLA aborted the process after 40 s.
            jax.block_until_ready(totals)
        sums = p_eval(rstate, batch)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = distributed.first_replica(totals)
    count = max(float(totals["count"]), 1.0)
    return {"test/loss": float(totals["loss"]) / count,
            "test/accuracy": float(totals["correct"]) / count}


def prunable_zero_fraction(params: PyTree) -> float:
    """Fraction of conv/dense kernel entries that are exactly zero."""
    flags = gj.prunable.prunable_flags(params)
    leaves = [x for x, f in zip(jax.tree_util.tree_leaves(params), flags) if f]
    zeros = sum(int(jnp.sum(x == 0)) for x in leaves)
    return zeros / sum(x.size for x in leaves)


@jax.jit
def _pruned_nonzero(params: PyTree, masks: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda p, m: jnp.sum(jnp.logical_and(~m, p != 0)), params, masks)


def check_pruned_weights_are_zero(params: PyTree, masks: PyTree) -> None:
    """Raise SparsityDriftError naming every leaf where a pruned weight is not 0."""
    counts = jax.device_get(_pruned_nonzero(params, masks))
    bad = [f"{name} ({int(n)} weights)" for name, n in named_leaves(counts) if n]
    if bad:
        raise SparsityDriftError("pruned weights are no longer zero in: " + ", ".join(bad))
