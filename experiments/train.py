"""Prune at initialization, then train data-parallel with the masks fixed.

``train_and_evaluate(config, workdir)`` is the whole run: initialize the
network with the paper's init, score and prune (or restore the latest
checkpoint), then train with ``jax.pmap`` over the local devices, evaluating
every epoch and checkpointing with orbax.

Data parallelism. The global batch (``config.batch_size``) is split evenly
over every device of every process; each device computes the mean loss and
gradient of its share and the gradients are averaged with ``lax.pmean`` over
the axis ``"batch"``. For networks without BatchNorm this is exactly the
single-device computation, whatever the device count.

BatchNorm. As in the Flax ImageNet example and PyTorch DDP without SyncBN,
each device normalizes with the statistics of its own share of the batch.
The *running* averages are averaged across devices at the end of every step
(one small all-reduce of per-channel vectors, next to the gradient
all-reduce) rather than only before evaluation: replicas then never diverge,
a checkpoint is simply replica 0, and a run resumed from any step (a SIGTERM
may arrive anywhere) continues exactly as if it had not stopped.

Determinism. Initialization, scoring data and masks derive from
``config.seed``; the data stream restarts at batch ``step``; dropout keys are
``fold_in(fold_in(rng, step), device)``. A run stopped and resumed therefore
reaches the same parameters as one that never stopped.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils

import grasp_jax as gj
from grasp_jax import input_pipeline, models
from grasp_jax.prunable import named_leaves
from experiments import checkpointing, configs, distributed, methods, report
from experiments.configs import Config
from experiments.logging_utils import MetricWriter, Progress, format_duration, is_main_process, log

PyTree = Any
AXIS = "batch"  # the pmap axis over which the global batch is split

# Exit status of a run stopped by SIGTERM after saving (128 + SIGTERM, as a
# shell reports it): the run is not finished, rerunning the command resumes.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


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


# --------------------------------------------------------------------------
# Optimizer and state.


def learning_rate_schedule(config: Config) -> optax.Schedule:
    """lr, multiplied by ``lr_decay_factor`` from the first step of each decay epoch."""
    return optax.piecewise_constant_schedule(config.lr, configs.lr_boundaries(config))


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
        opt_state=tx.init(params), masks=jax.tree_util.tree_map(lambda m: jnp.asarray(m, bool), masks),
        rng=rng,
    )


# --------------------------------------------------------------------------
# The steps: pure functions of (state, batch), mapped over devices at the edge.


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, batch: dict, *, model: nn.Module,
               tx: optax.GradientTransformation, axis_name: str = AXIS) -> tuple[TrainState, dict]:
    """One SGD step on this device's share of the global batch (call under pmap)."""
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(axis_name))

    def loss_fn(params):
        logits, new_vars = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
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
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, axis_name: str = AXIS) -> dict:
    """Sums over the real (``mask``) examples of the global batch (call under pmap)."""
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    sums = {
        "loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
        "count": jnp.sum(mask),
    }
    return jax.lax.psum(sums, axis_name)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation) -> Callable:
    # The state is donated: its buffers are reused for the new state.
    return jax.pmap(functools.partial(train_step, model=model, tx=tx), axis_name=AXIS,
                    donate_argnums=(0,))


def make_eval_step(model: nn.Module) -> Callable:
    return jax.pmap(functools.partial(eval_step, model=model), axis_name=AXIS)


@jax.jit
def _pruned_nonzero(params: PyTree, masks: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda p, m: jnp.sum(jnp.logical_and(~m, p != 0)), params, masks)


def check_pruned_weights_are_zero(params: PyTree, masks: PyTree) -> None:
    """Raise SparsityDriftError naming every leaf where a pruned weight is not 0."""
    counts = jax.device_get(_pruned_nonzero(params, masks))
    bad = [f"{name} ({int(n)} weights)" for name, n in named_leaves(counts) if n]
    if bad:
        raise SparsityDriftError("pruned weights are no longer zero in: " + ", ".join(bad))


# --------------------------------------------------------------------------
# Evaluation.


def evaluate(p_eval: Callable, rstate: TrainState, eval_ds) -> dict[str, float]:
    """Test loss and accuracy over the whole evaluation split (padding excluded)."""
    totals = None
    for batch in input_pipeline.prefetch_to_device(eval_ds.as_numpy_iterator(), axis_name=AXIS):
        sums = p_eval(rstate, batch)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = distributed.first_replica(totals)
    count = max(float(totals["count"]), 1.0)
    return {"test/loss": float(totals["loss"]) / count, "test/accuracy": float(totals["correct"]) / count}


# --------------------------------------------------------------------------
# Host-side helpers.


def _host_copy(rstate: TrainState) -> dict:
    return distributed.first_replica(rstate.as_dict())


def prunable_zero_fraction(params: PyTree) -> float:
    """Fraction of conv/dense kernel entries that are exactly zero."""
    flags = gj.prunable_flags(params)
    leaves = [np.asarray(x) for x, f in zip(jax.tree_util.tree_leaves(params), flags) if f]
    zeros = sum(int(np.sum(x == 0)) for x in leaves)
    return zeros / sum(x.size for x in leaves)


class _SigtermFlag:
    """Turns SIGTERM into a flag the training loop polls, so it can save and stop."""

    def __init__(self) -> None:
        self.set = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave the default handler alone
            pass

    def _handle(self, signum, frame) -> None:
        self.set = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def write_pruning_outputs(workdir: str, config: Config, masks: PyTree,
                          order: Sequence[str] = ()) -> gj.SparsityReport:
    """sparsity.md, density.png and masks.npz, layers in ``order`` (network order)."""
    sparsity = report.in_network_order(gj.sparsity_report(masks), order)
    if is_main_process():
        report.write_sparsity_markdown(os.path.join(workdir, "sparsity.md"), sparsity, config)
        report.save_density_plot(os.path.join(workdir, "density.png"), sparsity, config)
        report.save_masks(os.path.join(workdir, "masks.npz"), masks,
                          [layer.name for layer in sparsity.layers])
    return sparsity


# --------------------------------------------------------------------------
# The run.


def train_and_evaluate(config: Config, workdir: str) -> dict:
    """Prune, train and evaluate; resume from ``workdir``'s latest checkpoint if any.

    Returns the results dict (also written to ``results.json``) with
    ``"preempted": True`` if a SIGTERM stopped the run after saving.
    Raises SparsityDriftError if a pruned weight moves off zero.
    """
    session_start = time.time()
    info = input_pipeline.get_info(config.dataset)
    model = models.get_model(config.arch, info.num_classes)
    init_key, score_key, step_key = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    ckpt = checkpointing.Checkpointer(workdir, config.keep_checkpoints)
    writer = MetricWriter(workdir)
    variables = init_variables(model, init_key, info.image_shape)

    latest = ckpt.latest_step()
    flow_path = os.path.join(workdir, "gradient_flow.json")
    if latest is None:
        masks = methods.compute_masks(config, model, variables, score_key, info.image_shape, log=log)
        dense_variables = variables
        if config.ablation == "reinit":
            # Same masks, new weights: does the method pick weights or just layer densities?
            variables = init_variables(model, jax.random.fold_in(init_key, 1), info.image_shape)
            log("ablation reinit: training the kept weights from a fresh initialization")
        if config.gradient_flow:
            flow = methods.gradient_flow_report(config, model, dense_variables, variables, masks,
                                                jax.random.fold_in(score_key, 3), log=log)
            if is_main_process():
                report.write_json(flow_path, flow)
        del dense_variables
        state = create_state(variables, masks, make_optimizer(config, masks), step_key)
        meta = {"best_test_accuracy": None, "best_step": None, "wall_time_s": 0.0,
                "train_time_s": 0.0, "train_images": 0}
    else:
        log(f"resuming from step {latest}")
        ones = jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), variables["params"])
        abstract = jax.eval_shape(
            lambda: create_state(variables, ones, make_optimizer(config, ones), step_key)).as_dict()
        restored, meta = ckpt.restore(latest, abstract)
        state = TrainState(**restored)
        masks = state.masks
        writer.truncate_after(latest)
    # Multi-host: every process must train the same sparse network.
    distributed.check_masks_agree(masks)
    tx = make_optimizer(config, masks)
    sparsity = write_pruning_outputs(workdir, config, masks,
                                     models.layer_order(model, info.image_shape))
    log(str(sparsity))
    log(f"sparsity {sparsity.sparsity:.4%} of {sparsity.total:,} prunable weights "
        f"({sparsity.kept:,} kept; {sparsity.dense_params:,} other parameters dense)")

    p_train = make_train_step(model, tx)
    p_eval = make_eval_step(model)
    # Named like the pmap axis: pmap's outputs carry that mesh, so inputs that
    # match it spare a second compilation of the train step at step 2.
    rstate = jax_utils.replicate(state, axis_name=AXIS)
    del state, variables
    step = latest or 0
    spe = config.steps_per_epoch
    lr_fn = learning_rate_schedule(config)
    eval_ds = input_pipeline.eval_dataset(
        config.dataset, global_batch_size=config.batch_size, data_dir=config.data_dir)
    batches = input_pipeline.prefetch_to_device(input_pipeline.train_iterator(
        config.dataset, global_batch_size=config.batch_size, seed=config.seed,
        data_dir=config.data_dir, start_step=step), axis_name=AXIS)

    sigterm = _SigtermFlag()
    progress = Progress(total=config.num_steps, initial=step)
    pending: list = []  # device metrics not yet fetched (fetching every step would sync)
    window_start, window_images = time.time(), 0
    epoch_sums = {"loss": 0.0, "accuracy": 0.0, "n": 0}
    last_eval: dict = {}
    session_train_time, session_images, compiled = 0.0, 0, False
    preempted = False

    def flush_train_metrics() -> None:
        nonlocal pending, window_start, window_images
        if not pending:
            return
        fetched = distributed.first_replica(pending)
        losses = [float(m["loss"]) for m in fetched]
        accs = [float(m["accuracy"]) for m in fetched]
        elapsed = time.time() - window_start
        ips = window_images / elapsed if elapsed > 0 and window_images else float("nan")
        metrics = {"train/loss": float(np.mean(losses)), "train/accuracy": float(np.mean(accs)),
                   "train/lr": float(lr_fn(step - 1)), "train/images_per_sec": ips}
        epoch_sums["loss"] += sum(losses)
        epoch_sums["accuracy"] += sum(accs)
        epoch_sums["n"] += len(losses)
        writer.write(step, metrics)
        steps_per_s = len(pending) / elapsed if elapsed > 0 else float("nan")
        progress.report(step, metrics, (config.num_steps - step) / steps_per_s)
        pending, window_start, window_images = [], time.time(), 0

    def save(step: int) -> None:
        host = _host_copy(rstate)
        check_pruned_weights_are_zero(host["params"], host["masks"])
        meta["wall_time_s"] = meta_wall_base + (time.time() - session_start)
        meta["train_time_s"] = meta_train_base + session_train_time
        meta["train_images"] = meta_images_base + session_images
        ckpt.save(step, host, dict(meta))

    meta_wall_base, meta_train_base = float(meta["wall_time_s"]), float(meta["train_time_s"])
    meta_images_base = int(meta["train_images"])
    try:
        t_step = time.time()
        while step < config.num_steps:
            batch = next(batches)
            rstate, metrics = p_train(rstate, batch)
            step += 1
            pending.append(metrics)
            window_images += config.batch_size
            progress.advance(step)
            if not compiled:
                # The first step includes compilation: keep it out of throughput figures.
                jax.block_until_ready(metrics)
                compiled, t_step, window_start, window_images = True, time.time(), time.time(), 0
            else:
                session_images += config.batch_size
            epoch_end = step % spe == 0
            last = step == config.num_steps
            # Saving is collective across processes, so they must agree on stopping: several
            # processes compare their flags at logging steps and epoch ends only.
            stop = sigterm.set if jax.process_count() == 1 else (
                (step % config.log_every_steps == 0 or epoch_end or last)
                and distributed.any_process(sigterm.set))
            if step % config.log_every_steps == 0 or epoch_end or last or stop:
                flush_train_metrics()
            if epoch_end or last:
                session_train_time += time.time() - t_step
                last_eval = evaluate(p_eval, rstate, eval_ds)
                acc = last_eval["test/accuracy"]
                if meta["best_test_accuracy"] is None or acc > meta["best_test_accuracy"]:
                    meta["best_test_accuracy"], meta["best_step"] = acc, step
                n = max(epoch_sums["n"], 1)
                epoch_metrics = {"epoch": step / spe, **last_eval,
                                 "test/best_accuracy": meta["best_test_accuracy"],
                                 "train/epoch_loss": epoch_sums["loss"] / n,
                                 "train/epoch_accuracy": epoch_sums["accuracy"] / n}
                writer.write(step, epoch_metrics)
                writer.flush()
                elapsed = meta_wall_base + time.time() - session_start
                log(f"epoch {step / spe:.4g}/{config.epochs} (step {step}): "
                    f"train loss {epoch_metrics['train/epoch_loss']:.4f} "
                    f"acc {epoch_metrics['train/epoch_accuracy']:.2%} | test loss "
                    f"{last_eval['test/loss']:.4f} acc {acc:.2%} "
                    f"(best {meta['best_test_accuracy']:.2%}) | lr {float(lr_fn(step - 1)):.4g} | "
                    f"elapsed {format_duration(elapsed)}")
                epoch_sums = {"loss": 0.0, "accuracy": 0.0, "n": 0}
                t_step = window_start = time.time()
            every = config.checkpoint_every_steps
            if epoch_end or last or stop or (every and step % every == 0):
                flush_train_metrics()  # keeps saving time out of the throughput window
                session_train_time += time.time() - t_step
                save(step)
                t_step = window_start = time.time()
            if stop and not last:
                log(f"SIGTERM: saved a checkpoint at step {step}; rerun the same command to resume")
                preempted = True
                break
        if not compiled:
            # Resumed a finished run: evaluate the restored state for the results.
            last_eval = evaluate(p_eval, rstate, eval_ds)
    finally:
        progress.close()
        sigterm.restore()
        ckpt.close()
        writer.close()

    host = _host_copy(rstate)
    results = {
        "arch": config.arch, "dataset": config.dataset, "method": config.method,
        "seed": config.seed, "steps": step, "epochs": step / spe, "preempted": preempted,
        "sparsity_target": config.sparsity,
        "sparsity_reached": sparsity.sparsity,
        "prunable_zero_fraction": prunable_zero_fraction(host["params"]),
        "prunable_weights": sparsity.total, "kept_weights": sparsity.kept,
        "final_test_accuracy": last_eval.get("test/accuracy"),
        "final_test_loss": last_eval.get("test/loss"),
        "best_test_accuracy": meta["best_test_accuracy"], "best_step": meta["best_step"],
        "wall_time_s": meta_wall_base + time.time() - session_start,
        "train_images_per_sec": _ratio(meta_images_base + session_images,
                                       meta_train_base + session_train_time),
        "devices": jax.device_count(), "processes": jax.process_count(),
        "ablation": config.ablation,
    }
    if os.path.exists(flow_path):  # written once, before training; kept across resumes
        with open(flow_path) as f:
            results["gradient_flow"] = json.load(f)
    if is_main_process() and not preempted:
        report.write_json(os.path.join(workdir, "results.json"), results)
        log(f"done: final test accuracy {results['final_test_accuracy']:.2%}, best "
            f"{results['best_test_accuracy']:.2%}, sparsity {results['sparsity_reached']:.4%}, "
            f"{format_duration(results['wall_time_s'])} wall, "
            f"{results['train_images_per_sec']:.1f} train img/s")
    return results


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")
