"""How the data-dependent criteria (GraSP, SNIP, any core criterion that needs
g or Hg) and the gradient-flow report meet the network, the data and the devices.

Which images they see (class-balanced draws, or the first training batches),
in which mode BatchNorm runs (training, each chunk normalized by its own
statistics, as the reference's ``net.train()``), the temperature, the
re-drawn scoring copy, and how chunks are dealt to devices when a run has
several.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import grasp_jax as gj
from grasp_jax import data, models
from grasp_jax.prunable import named_leaves

from experiments import distributed
from experiments.config_schema import Config

PyTree = Any
ScoreFn = Callable[[PyTree], PyTree]


def never() -> bool:
    return False


@dataclasses.dataclass(frozen=True)
class Context:
    """What a score-function builder may use: the run's config and its dataset's info
    (made once when the run starts), the network at its initialization, a key for the
    criterion's own randomness, a logger, and ``stop_requested()``, which long scoring
    polls between batches (on every process at the same points: it may be a
    collective) to raise ``signals.Stopped``."""

    config: Config
    info: data.DatasetInfo
    model: nn.Module
    variables: PyTree  # {"params": ..., "batch_stats": ...}
    key: jax.Array
    log: Callable[[str], None] = print
    stop_requested: Callable[[], bool] = never

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one image the network takes: (height, width, channels)."""
        return tuple(self.info.image_shape)

    @property
    def params(self) -> PyTree:
        return self.variables["params"]

    @property
    def batch_stats(self) -> PyTree:
        return self.variables.get("batch_stats", {})

# The pmap axis of data-parallel scoring.
SCORE_AXIS = "score"


def scoring_batch(config: Config, info: data.DatasetInfo) -> dict[str, np.ndarray]:
    """The data the data-dependent criteria score with, concatenated.

    Class-balanced draws (CIFAR, Tiny-ImageNet, digits) are concatenated draw
    after draw, so that feeding the batch in ``2 * draws`` equal chunks gives
    the reference's two halves of every draw. Every process computes the same
    batch, hence the same masks. (With ``score_batches``, ImageNet, the
    batches are streamed instead: ``experiments.streamed_scoring``.) ``info`` is
    the config's dataset's.
    """
    parts = [
        data.scoring_batch(
            info, samples_per_class=config.score_samples_per_class,
            seed=config.seed, draw=d, data_dir=config.data_dir,
        )
        for d in range(config.score_draws)
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label")}


def make_loss_fn(model: nn.Module, batch_stats: PyTree, temperature: float,
                 dropout_key: jax.Array, bn_mode: str = "train"
                 ) -> Callable[[PyTree, PyTree], jax.Array]:
    """``loss(params, batch)`` for scoring, logits divided by ``temperature``.

    ``bn_mode="train"`` (the GraSP authors'): BatchNorm normalizes each chunk
    by its own statistics and the running averages are thrown away; dropout
    is active. ``"eval"`` (Synaptic-Flow's default): running statistics, no
    dropout. A batch with a ``weight`` entry (data-parallel scoring: 1 in real
    chunks, 0 in a device's padding chunks) has its loss multiplied by the
    chunk's weight."""
    train = bn_mode == "train"

    def loss_fn(params, batch):
        logits, _ = model.apply(
            {"params": params, "batch_stats": batch_stats}, batch["image"], train=train,
            mutable=["batch_stats"], rngs={"dropout": dropout_key},
        )
        loss = gj.cross_entropy_with_temperature(logits, batch["label"], temperature)
        if "weight" in batch:
            loss = loss * jnp.mean(batch["weight"])
        return loss

    return loss_fn


# --------------------------------------------------------------------------
# Several devices: each scores whole chunks; the core sums g and Hg over all.


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


def data_parallel_scorer(criterion: gj.criteria.Criterion, loss_fn: Callable,
                         batch: dict[str, np.ndarray],
                         num_chunks: int) -> Callable[[PyTree], PyTree]:
    """``params -> scores`` of a data-dependent core ``criterion`` over every device of
    every process.

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
        return gj.scores(criterion, params, loss_fn, chunks, num_microbatches=per_device,
                         axis_name=SCORE_AXIS)

    p_score = jax.pmap(score, axis_name=SCORE_AXIS, in_axes=(None, 0))

    def score_fn(params: PyTree) -> PyTree:
        # Every device holds the same scores; read this process's first one.
        return distributed.first_replica(p_score(params, local))

    return score_fn


# --------------------------------------------------------------------------
# The scoring copy.

# PyTorch's nn.init.xavier_normal_: an untruncated normal of variance 2 / (fan_in + fan_out).
_xavier_normal = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal")


def reinit_dense_kernels(params: PyTree, key: jax.Array, layers: str = "all",
                         order: Sequence[str] = ()) -> PyTree:
    """A copy of ``params`` whose prunable dense (2-D) kernels are redrawn Xavier-normal.

    The reference GraSP scores a copy of the network in which the ``nn.Linear``
    weights are re-initialized this way: every one of them on CIFAR and
    Tiny-ImageNet (``pruner/GraSP.py``), only the last on ImageNet
    (``pruner/GraSP_ImageNet.py``: ``fc_layers[-1]``); ``layers`` is ``"all"``
    or ``"last"``, the last in ``order`` (module paths in call order, from
    ``models.layer_order``; flattening order without it). The masks then go
    to the original network. Weights that are exactly zero (pruned in an
    earlier round) stay zero.
    """
    flags = gj.prunable.prunable_flags(params)
    names = [name for name, _ in named_leaves(params)]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    dense = [i for i, (x, f) in enumerate(zip(leaves, flags)) if f and x.ndim == 2]
    if layers == "last" and dense:
        rank = {path: r for r, path in enumerate(order)}
        dense = [max(dense, key=lambda i: (rank.get(names[i].rsplit("/", 1)[0], -1), i))]
    keys = jax.random.split(key, len(leaves))
    out = [jnp.where(x != 0, _xavier_normal(k, x.shape, x.dtype), 0) if i in dense else x
           for i, (x, k) in enumerate(zip(leaves, keys))]
    return jax.tree_util.tree_unflatten(treedef, out)


def on_scoring_copy(ctx: Context, scores_of: ScoreFn) -> ScoreFn:
    """``scores_of``, applied to the re-drawn scoring copy when the config asks for one
    (``score_reinit_dense``; see :func:`reinit_dense_kernels`)."""
    config = ctx.config
    if not config.score_reinit_dense:
        return scores_of
    reinit_key = jax.random.fold_in(ctx.key, 1)
    order = models.layer_order(ctx.model, ctx.image_shape)
    return lambda p: scores_of(reinit_dense_kernels(p, reinit_key, config.score_reinit_layers,
                                                    order))


def reinit_note(config: Config) -> str:
    if not config.score_reinit_dense:
        return ""
    return f", {config.score_reinit_layers} dense layer(s) re-drawn Xavier-normal"


def in_memory_scorer(ctx: Context, criterion: gj.criteria.Criterion) -> ScoreFn:
    """``params -> scores`` of a data-dependent core ``criterion`` on the class-balanced
    draws, all in host memory, in ``2 * draws`` equal chunks."""
    config = ctx.config
    batch = scoring_batch(config, ctx.info)
    k = config.num_score_microbatches
    ctx.log(f"scoring with {config.method} on {len(batch['label'])} training images in {k} "
            f"chunks (temperature {config.temperature:g}, BatchNorm {config.score_bn_mode} "
            f"mode{reinit_note(config)})")
    loss_fn = make_loss_fn(ctx.model, ctx.batch_stats, config.temperature, ctx.key,
                           config.score_bn_mode)
    if jax.device_count() > 1:
        ctx.log(f"  data-parallel: {chunks_per_device(k, jax.device_count())} chunk(s) per "
                f"device on {jax.device_count()} devices")
        scores_of = data_parallel_scorer(criterion, loss_fn, batch, k)
    else:
        # Left in host memory: the core feeds an eager call chunk by chunk, so
        # the device holds one chunk at a time.
        def scores_of(p):
            return gj.scores(criterion, p, loss_fn, batch, num_microbatches=k)

    return scores_of


# --------------------------------------------------------------------------
# Gradient flow before and after pruning.


def diagnostics_batch(config: Config, info: data.DatasetInfo) -> dict[str, np.ndarray]:
    """One training batch that is not the scoring batch: another seed's first batch."""
    (batch,) = data.first_batches(
        info, 1, config.batch_size, seed=config.seed + 7919,
        data_dir=config.data_dir)
    return batch


def gradient_flow_report(config: Config, info: data.DatasetInfo, model: nn.Module,
                         dense: PyTree, pruned: PyTree, masks: PyTree, key: jax.Array,
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
    batch = diagnostics_batch(config, info)
    # One loss function for both: in training mode BatchNorm normalizes with the
    # batch's own statistics and the running averages only flow out, so they do
    # not change the loss, and one jitted program serves before and after.
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
