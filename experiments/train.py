"""The flow of one run: prune at initialization (or restore), then train data-parallel.

``train_and_evaluate(config, workdir, info)`` initializes the network with the
paper's init, scores and prunes it (or restores the newest intact
checkpoint), then trains with ``jax.pmap`` over the local devices
(``experiments.steps``), evaluating every epoch and checkpointing with orbax.

Determinism. Initialization, scoring data and masks derive from
``config.seed``; the data stream restarts at batch ``step``; dropout keys are
``fold_in(fold_in(rng, step), device)``. A run stopped and resumed therefore
reaches the same parameters as one that never stopped.

A run ends in one of three ways, ``results["status"]``: ``done``;
``stopped`` by a signal after saving (no results.json: it is not finished);
``diverged``: a non-finite loss or gradient stopped it before any checkpoint
of non-finite values was written (results.json says so, and claims no
accuracy).

The flow of one run, each step in its module:

0. ``run.main``: the flags checked into a config (``run_config.checked_config``),
   with the dataset's info, made once there for the checks and passed down from
   there to every step below that reads the data.
1. ``session.run``: the workdir's lock, the config saved, the exit status.
2. ``train_and_evaluate`` (here): the networks (``grasp_jax.models``), the
   checkpointer (``checkpointing``) and the metric writers (``metrics``), each
   made once and passed down.
3. ``init_or_restore``: the newest intact checkpoint (``checkpointing``), or
   a fresh network (``steps.init_variables``) pruned by the method
   (``methods.compute_masks``, polling for a stop), its gradient-flow report
   (``data_scoring``), and the optimizer with the masks (``steps.make_optimizer``).
4. ``write_pruning_outputs``: sparsity.md, density.png, masks.npz (``report``).
5. ``train_loop``: the pmapped steps (``steps``), evaluation every epoch,
   metrics (``metrics``) and checkpoints on ``Cadence``; the run's metadata
   (:class:`RunMeta`) goes into every checkpoint and comes back on resume.
6. ``finish``: results.json and the sparse parameters (``report``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils

import grasp_jax as gj
from grasp_jax import data, models

from experiments import (
    ablations,
    checkpointing,
    data_scoring,
    devices,
    distributed,
    methods,
    paths,
    report,
    steps,
)
from experiments.clock import Chrono
from experiments.config_schema import Config
from experiments.logging_utils import Progress, is_main_process, log
from experiments.metrics import MetricsWindow, MetricWriter
from experiments.outputs import format_duration, format_rate
from experiments.signals import StopSignals
from experiments.steps import AXIS, TrainState

PyTree = Any


class LayerCollapseError(ValueError):
    """The masks empty a whole prunable layer (refused unless allowed)."""


class TopologyChanged(ValueError):
    """A checkpoint saved on another number of devices or processes (refused unless allowed)."""


def topology() -> dict:
    """The device and process counts a run trains on; saved in each checkpoint's meta,
    since the per-device batches (and batch statistics, dropout keys) depend on them."""
    return {"devices": jax.device_count(), "processes": jax.process_count()}


def check_topology(meta: dict, step: int, allowed: bool) -> None:
    """TopologyChanged naming both topologies unless the checkpoint's is this one's (or allowed)."""
    saved = {k: meta.get(k) for k in ("devices", "processes")}
    now = topology()
    if None in saved.values() or saved == now:
        return  # a checkpoint from before topologies were saved: nothing to compare
    what = (f"the checkpoint at step {step} was saved by {saved['devices']} device(s) in "
            f"{saved['processes']} process(es); this run has {now['devices']} device(s) in "
            f"{now['processes']} process(es)")
    if not allowed:
        raise TopologyChanged(f"{what}: resuming would train a different trajectory than an "
                              "uninterrupted run. Rerun on the same topology, or pass "
                              "--allow_topology_change to resume anyway")
    log(f"warning: {what} (--allow_topology_change): the result will differ from an "
        "uninterrupted run")


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When the periodic actions of the loop fire, by step number (1-based, after the step).
    Checkpoints follow the checkpointer's orbax save policy (:func:`save_policy`)."""

    config: Config
    ckpt: checkpointing.Checkpointer

    def epoch_end(self, step: int) -> bool:
        return step % self.config.steps_per_epoch == 0

    def last(self, step: int) -> bool:
        return step == self.config.num_steps

    def evaluate(self, step: int) -> bool:
        return self.epoch_end(step) or self.last(step)

    def log(self, step: int) -> bool:
        return step % self.config.log_every_steps == 0 or self.evaluate(step)

    def checkpoint(self, step: int) -> bool:
        return self.ckpt.should_save(step)

    def stop(self, step: int, signals: StopSignals) -> bool:
        # Saving is collective across processes, so they must agree on stopping:
        # several processes compare their flags at logging steps only.
        if jax.process_count() == 1:
            return signals.signum is not None
        if self.log(step) and distributed.any_process(signals.signum is not None):
            signals.stop_with_others()
            return True
        return False


PRUNING_STOP = ("stopping at the end of the current batch or round of pruning; nothing is "
                "saved before the first step")


@dataclasses.dataclass(frozen=True)
class RunMeta:
    """What a run has learned about itself, saved with every checkpoint and restored on
    resume: the best test accuracy and its step, the gradient-flow report made at
    pruning (None when not measured), and the run clock (``experiments.clock``)."""

    best_test_accuracy: Optional[float] = None
    best_step: Optional[int] = None
    gradient_flow: Optional[dict] = None
    clock: dict = dataclasses.field(default_factory=dict)

    def after_eval(self, step: int, accuracy: float) -> "RunMeta":
        if self.best_test_accuracy is not None and accuracy <= self.best_test_accuracy:
            return self
        return dataclasses.replace(self, best_test_accuracy=accuracy, best_step=step)

    def as_json(self, chrono: Chrono) -> dict:
        """The checkpoint's meta item (flat: the clock's fields beside the others)."""
        out = {"best_test_accuracy": self.best_test_accuracy, "best_step": self.best_step,
               **chrono.as_meta()}
        if self.gradient_flow is not None:
            out["gradient_flow"] = self.gradient_flow
        return out

    @classmethod
    def from_json(cls, meta: dict) -> "RunMeta":
        clock = {k: meta[k] for k in Chrono(None).as_meta() if k in meta}
        return cls(meta.get("best_test_accuracy"), meta.get("best_step"),
                   meta.get("gradient_flow"), clock)


@dataclasses.dataclass(frozen=True)
class Start:
    """Where training starts: the state, its optimizer, the run's metadata and step."""

    state: TrainState
    tx: optax.GradientTransformation
    meta: RunMeta
    step: int


# --------------------------------------------------------------------------
# Start: a fresh, pruned state or the newest checkpoint that restores.


def init_or_restore(config: Config, model, info: data.DatasetInfo,
                    ckpt: checkpointing.Checkpointer, allow_layer_collapse: bool = False,
                    signals: Optional[StopSignals] = None,
                    allow_topology_change: bool = False) -> Start:
    """Restored, else initialized and pruned; the optimizer is made here, once, for the
    masks the run trains with. ``info`` is the config's dataset's.

    A stop signal during long pruning raises ``signals.Stopped`` (nothing is saved yet)."""
    image_shape = info.image_shape
    init_key, score_key, step_key = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    variables = steps.init_variables(model, init_key, image_shape)
    # Shapes only: the optimizer's state has the same structure whatever the masks hold.
    ones = jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), variables["params"])
    abstract = jax.eval_shape(lambda: steps.create_state(
        variables, ones, steps.make_optimizer(config, ones), step_key)).as_dict()
    restored = ckpt.restore_newest(abstract, log=log, is_main=is_main_process())
    if restored is not None:
        step, state, meta = restored
        check_topology(meta, step, allow_topology_change)
        log(f"resuming from step {step}")
        return Start(TrainState(**state), steps.make_optimizer(config, state["masks"]),
                     RunMeta.from_json(meta), step)

    signals = signals or StopSignals()
    # Pruning that polls says, from its first poll, that a signal stops it there; the rest
    # runs to its end and the first step saves.
    with signals.polled(PRUNING_STOP, agree=distributed.any_process) as stop_requested:
        masks = methods.compute_masks(config, model, variables, score_key, info, log=log,
                                      stop_requested=stop_requested)
    check_layer_collapse(config, masks, allow_layer_collapse)
    dense = variables
    variables = ablations.training_variables(
        config, variables, masks,
        lambda: steps.init_variables(model, jax.random.fold_in(init_key, 1), image_shape), log)
    flow = None
    if config.gradient_flow:
        flow = data_scoring.gradient_flow_report(config, info, model, dense, variables, masks,
                                                 jax.random.fold_in(score_key, 3), log=log)
    tx = steps.make_optimizer(config, masks)
    return Start(steps.create_state(variables, masks, tx, step_key), tx,
                 RunMeta(gradient_flow=flow), 0)


def check_layer_collapse(config: Config, masks: PyTree, allowed: bool) -> None:
    collapsed = gj.sparsity_report(masks).collapsed
    if not collapsed:
        return
    what = (f"{config.method} at sparsity {config.sparsity:g} empties {len(collapsed)} prunable "
            f"layer(s): {', '.join(collapsed)}")
    if not allowed:
        raise LayerCollapseError(f"{what}; the network cannot learn through them. Lower "
                                 "--sparsity, try --scope layerwise, or pass "
                                 "--allow_layer_collapse to train anyway")
    log(f"warning: {what} (--allow_layer_collapse)")


def write_pruning_outputs(workdir: str, config: Config, masks: PyTree,
                          order: Sequence[str] = (),
                          gradient_flow: Optional[dict] = None) -> gj.masks.SparsityReport:
    """sparsity.md, density.png and masks.npz, layers in ``order`` (network order), and
    gradient_flow.json when the run measured it."""
    sparsity = report.in_network_order(gj.sparsity_report(masks), order)
    if is_main_process():
        report.write_sparsity_markdown(paths.join(workdir, "sparsity.md"), sparsity, config)
        report.save_density_plot(paths.join(workdir, "density.png"), sparsity, config)
        report.save_masks(paths.join(workdir, "masks.npz"), masks,
                          [layer.name for layer in sparsity.layers])
        if gradient_flow is not None:
            report.write_json(paths.join(workdir, "gradient_flow.json"), gradient_flow)
    return sparsity


# --------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class Outcome:
    status: str = "done"  # done | stopped | diverged
    step: int = 0  # the steps trained when the loop ended
    meta: RunMeta = dataclasses.field(default_factory=RunMeta)  # as of the loop's end
    diverged_at_step: Optional[int] = None
    diverged_in: str = ""  # "training" or "evaluation"
    last_eval: dict = dataclasses.field(default_factory=dict)
    zero_fraction: Optional[float] = None  # of the prunable weights, at the end
    final: Optional[dict] = None  # host copies of the trained params and the masks


def train_and_evaluate(config: Config, workdir: str, info: data.DatasetInfo,
                       allow_layer_collapse: bool = False,
                       signals: Optional[StopSignals] = None,
                       allow_topology_change: bool = False) -> dict:
    """Prune, train and evaluate; resume from ``workdir``'s newest intact checkpoint.
    ``info`` is the config's dataset's (``run_config.checked_config`` makes it).

    Returns the results dict (also written to ``results.json`` unless stopped
    by a signal). Raises LayerCollapseError (masks empty a layer), SparsityDriftError
    (a pruned weight moved), NoUsableCheckpoint (none restores).
    """
    started = time.time()
    # Initialization, scoring and the gradient-flow report use the float32 network whatever
    # --compute_dtype says: scores rank weights against each other, and bfloat16's 8-bit
    # mantissa would reorder close ones. Only the train and eval steps compute in that dtype.
    model = models.get_model(config.arch, info.num_classes)
    train_model = steps.training_model(config, info.num_classes)
    # Saved where evaluated (every epoch and the last step), and every
    # --checkpoint_every_steps.
    ckpt = checkpointing.Checkpointer(workdir, config.keep_checkpoints, checkpointing.save_policy(
        (config.steps_per_epoch, config.checkpoint_every_steps), (config.num_steps,)))
    writer = MetricWriter(workdir)
    signals = signals or StopSignals()
    try:
        start = init_or_restore(config, model, info, ckpt, allow_layer_collapse,
                                signals, allow_topology_change)
        writer.truncate_after(start.step)
        agreed = distributed.check_masks_agree(start.state.masks)  # every process, one network
        if agreed:
            log(agreed)
        sparsity = write_pruning_outputs(workdir, config, start.state.masks,
                                         models.layer_order(model, info.image_shape),
                                         start.meta.gradient_flow)
        log(f"{sparsity}\nsparsity {sparsity.sparsity:.4%} of {sparsity.total:,} prunable "
            f"weights ({sparsity.kept:,} kept; {sparsity.dense_params:,} other parameters dense)")
        chrono = Chrono(start.meta.clock, session_start=started)
        outcome = train_loop(config, info, train_model, start, chrono, ckpt, writer, signals)
    finally:
        try:
            ckpt.close()  # waits for the last save, which can fail (a full disk)
        finally:
            writer.close()  # TensorBoard's events flushed (uploaded on a bucket) even so
    return finish(config, workdir, outcome, chrono, sparsity, ckpt)


def train_loop(config: Config, info: data.DatasetInfo, model, start: Start, chrono: Chrono,
               ckpt: checkpointing.Checkpointer, writer: MetricWriter,
               signals: StopSignals) -> Outcome:
    """Train from ``start.step`` to ``config.num_steps``, evaluating and saving on ``Cadence``."""
    step, meta = start.step, start.meta
    pixel_stats = (info.mean, info.std)  # the batches are uint8: the steps normalize them
    p_train = steps.make_train_step(model, start.tx, pixel_stats)
    p_eval = steps.make_eval_step(model, pixel_stats)
    # Named like the pmap axis: pmap's outputs carry that mesh, so inputs that
    # match it spare a second compilation of the train step at step 2.
    rstate = jax_utils.replicate(start.state, axis_name=AXIS)
    del start
    eval_ds = data.eval_dataset(info, global_batch_size=config.batch_size,
                                data_dir=config.data_dir)
    batches = devices.prefetch_to_device(data.train_dataset(
        info, global_batch_size=config.batch_size, seed=config.seed,
        data_dir=config.data_dir, start_step=step).as_numpy_iterator(), axis_name=AXIS)
    lr = steps.learning_rate_schedule(config)
    cadence, window, outcome = Cadence(config, ckpt), MetricsWindow(), Outcome()

    def evaluate() -> dict:
        return steps.evaluate(p_eval, rstate, devices.prefetch_to_device(
            eval_ds.as_numpy_iterator(), axis_name=AXIS))

    with Progress(total=config.num_steps, initial=step) as progress:
        while step < config.num_steps:
            rstate, metrics = p_train(rstate, next(batches))
            step += 1
            window.add(step, metrics)
            chrono.step(config.batch_size)
            progress.advance(step)
            if not chrono.running:  # the first step compiled: keep it out of throughput
                jax.block_until_ready(metrics)
                chrono.start()
            stopping = cadence.stop(step, signals)
            if cadence.log(step) or stopping or cadence.checkpoint(step):
                bad = report_window(config, step, window, chrono, lr, writer, progress)
                if bad is not None:
                    return dataclasses.replace(outcome, status="diverged", step=step, meta=meta,
                                               diverged_at_step=bad, diverged_in="training")
            if cadence.evaluate(step):
                with chrono.paused():
                    outcome.last_eval = evaluate()
                if not np.isfinite(outcome.last_eval["test/loss"]):
                    return dataclasses.replace(outcome, status="diverged", step=step, meta=meta,
                                               diverged_at_step=step, diverged_in="evaluation")
                meta = meta.after_eval(step, outcome.last_eval["test/accuracy"])
                log_epoch(config, step, outcome.last_eval, window.epoch(), meta, chrono, lr,
                          writer)
            if cadence.checkpoint(step) or stopping:
                with chrono.paused():
                    save(ckpt, step, rstate, meta, chrono)
                    writer.flush()  # a resume from this step finds every record up to it
            if stopping and not cadence.last(step):
                log(f"{signals.name}: saved a checkpoint at step {step} in {ckpt.directory}; "
                    "rerun the same command to resume")
                return dataclasses.replace(outcome, status="stopped", step=step, meta=meta)
    if not outcome.last_eval:  # resumed a finished run: evaluate the restored state
        outcome.last_eval = evaluate()
    final = distributed.first_replica({"params": rstate.params, "masks": rstate.masks})
    return dataclasses.replace(outcome, step=step, meta=meta, final=final,
                               zero_fraction=steps.prunable_zero_fraction(final["params"]))


def report_window(config: Config, step: int, window: MetricsWindow, chrono: Chrono, lr,
                  writer: MetricWriter, progress: Progress) -> Optional[int]:
    """Write the window's means; the first step that was not finite, or None."""
    means, bad = window.flush()
    if bad is None and means is not None:
        ips, sps = chrono.window()
        means.update({"train/lr": float(lr(step - 1)), "train/images_per_sec": ips})
        writer.write(step, means)
        progress.report(step, means, (config.num_steps - step) / sps)
    return bad


def save(ckpt: checkpointing.Checkpointer, step: int, rstate: TrainState, meta: RunMeta,
         chrono: Chrono) -> None:
    host = distributed.first_replica(rstate.as_dict())
    steps.check_pruned_weights_are_zero(host["params"], host["masks"])
    ckpt.save(step, host, {**meta.as_json(chrono), **topology()})


def log_epoch(config: Config, step: int, last_eval: dict, epoch: dict, meta: RunMeta,
              chrono: Chrono, lr, writer: MetricWriter) -> None:
    acc = last_eval["test/accuracy"]
    spe = config.steps_per_epoch
    writer.write(step, {"epoch": step / spe, **last_eval,
                        "test/best_accuracy": meta.best_test_accuracy, **epoch})
    writer.flush()
    log(f"epoch {step / spe:.4g}/{config.epochs} (step {step}): "
        f"train loss {epoch['train/epoch_loss']:.4f} acc {epoch['train/epoch_accuracy']:.2%} | "
        f"test loss {last_eval['test/loss']:.4f} acc {acc:.2%} "
        f"(best {meta.best_test_accuracy:.2%}) | lr {float(lr(step - 1)):.4g} | "
        f"elapsed {format_duration(chrono.wall_time_s)}")


# --------------------------------------------------------------------------
# Results.


def finish(config: Config, workdir: str, outcome: Outcome, chrono: Chrono,
           sparsity: gj.masks.SparsityReport, ckpt: checkpointing.Checkpointer) -> dict:
    """The results dict; written to results.json unless the run was stopped by a signal."""
    results = {
        "status": outcome.status,
        "arch": config.arch, "dataset": config.dataset, "method": config.method,
        "seed": config.seed, "steps": outcome.step,
        "epochs": outcome.step / config.steps_per_epoch, "sparsity_target": config.sparsity,
        "sparsity_reached": sparsity.sparsity,
        "prunable_weights": sparsity.total, "kept_weights": sparsity.kept,
        "collapsed_layers": list(sparsity.collapsed),
        "wall_time_s": chrono.wall_time_s, "train_images_per_sec": chrono.images_per_sec,
        "devices": jax.device_count(), "processes": jax.process_count(),
        "ablation": config.ablation, "preempted": outcome.status == "stopped",
        "compute_dtype": config.compute_dtype,
    }
    meta = outcome.meta
    if meta.gradient_flow is not None:  # measured once, before training; carried by checkpoints
        results["gradient_flow"] = meta.gradient_flow
    if outcome.status == "diverged":
        good = ckpt.latest_step()
        # The run went wrong at the first non-finite step; the later steps of its logging
        # window (where it was noticed) trained nothing worth counting.
        results.update(steps=outcome.diverged_at_step,
                       epochs=outcome.diverged_at_step / config.steps_per_epoch,
                       detected_at_step=outcome.step, diverged_at_step=outcome.diverged_at_step,
                       diverged_in=outcome.diverged_in, last_finite_checkpoint=good)
        log(f"error: the {outcome.diverged_in} loss or gradients are not finite at step "
            f"{outcome.diverged_at_step}: the run diverged (try a lower --lr). The last "
            f"checkpoint with finite values is "
            + (f"step {good} in {ckpt.directory}" if good is not None else "none (step 0)"))
    else:
        results.update(
            prunable_zero_fraction=outcome.zero_fraction,
            final_test_accuracy=outcome.last_eval.get("test/accuracy"),
            final_test_loss=outcome.last_eval.get("test/loss"),
            best_test_accuracy=meta.best_test_accuracy, best_step=meta.best_step)
    if is_main_process() and outcome.final is not None:
        # The pruned network as a sparse artifact: kept weights and their positions.
        results["sparse_params_bytes"] = report.save_sparse_params(
            paths.join(workdir, report.SPARSE_PARAMS), **outcome.final)
    if is_main_process() and outcome.status != "stopped":
        report.write_json(paths.join(workdir, "results.json"), results)
    if outcome.status == "done":
        log(f"done: final test accuracy {results['final_test_accuracy']:.2%}, best "
            f"{results['best_test_accuracy']:.2%}, sparsity {results['sparsity_reached']:.4%}, "
            f"{format_duration(results['wall_time_s'])} wall, "
            f"{format_rate(results['train_images_per_sec'])} train img/s")
    return results
