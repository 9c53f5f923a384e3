"""Scoring on many training batches (ImageNet), streamed: a few chunks in memory, not the set.

The reference prunes ImageNet on 150 batches of 250 images from the shuffled,
augmented training loader, each fed in chunks of 20 (12 x 20 + 10): g summed
over every chunk of every batch, then each chunk's Hg with that g. Here the
batches come from ``grasp_jax.data.scoring_stream``, which regenerates the
same batches for each pass, so host memory holds one batch and the devices a
few chunks, however many batches there are.

With several devices (on any number of hosts) every process regenerates each
batch and keeps its own devices' chunks: the full chunks of a batch are dealt
to the devices as for in-memory scoring (``data_scoring.deal_chunks``, padding
slots weighted 0), and the short last chunks of successive batches are
collected and dealt one per device. The core's ``accumulate_gradient`` and
``accumulate_hvp``, pmapped with ``axis_name``, sum every increment over all
devices, so each device ends with the sums over every chunk and every
process with the same scores.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import jax_utils

import grasp_jax as gj
from grasp_jax import data

from experiments import distributed
from experiments.data_scoring import SCORE_AXIS, Context, deal_chunks, make_loss_fn, reinit_note
from experiments.outputs import format_duration
from experiments.signals import Stopped

PyTree = Any
Batch = dict[str, np.ndarray]


def chunk_sizes(batch_size: int, chunk_size: int) -> list[int]:
    """The chunks a batch is fed in: as many ``chunk_size`` as fit, then the rest
    (250 by 20: 12 x 20 + 10)."""
    chunk = chunk_size or batch_size
    full, rest = divmod(batch_size, chunk)
    return [chunk] * full + ([rest] if rest else [])


def describe_chunks(sizes: list[int]) -> str:
    counts: dict[int, int] = {}
    for size in sizes:
        counts[size] = counts.get(size, 0) + 1
    return " + ".join(f"{n} x {size}" for size, n in counts.items())


def streamed_scorer(ctx: Context, criterion: gj.criteria.Criterion) -> Callable[[PyTree], PyTree]:
    """``params -> scores`` of a data-dependent core ``criterion`` over the config's
    ``score_batches`` training batches, in chunks of ``score_chunk_size``: one pass (g)
    when it needs the gradient, two (g, then Hg) when it needs the Hessian-vector product."""
    config = ctx.config
    stream = data.scoring_stream(ctx.info, config.score_batches,
                                 config.score_batch_size, seed=config.seed,
                                 data_dir=config.data_dir)
    sizes = chunk_sizes(config.score_batch_size, config.score_chunk_size)
    num_passes = 2 if criterion.needs == "hvp" else 1
    passes = "one pass" if num_passes == 1 else "two passes"
    ctx.log(f"scoring with {config.method} on {config.score_batches} batches of "
            f"{config.score_batch_size} training images, each in chunks of "
            f"{describe_chunks(sizes)}, streamed in {passes} (temperature "
            f"{config.temperature:g}, BatchNorm {config.score_bn_mode} mode{reinit_note(config)})")
    loss_fn = make_loss_fn(ctx.model, ctx.batch_stats, config.temperature, ctx.key,
                           config.score_bn_mode)
    chunk = config.score_chunk_size or config.score_batch_size
    watch = PassWatcher(ctx, config.score_batches, passes=num_passes)
    if jax.device_count() == 1:
        return lambda p: gj.scores_from_batches(criterion, p, loss_fn, stream,
                                                microbatch_size=chunk, progress=watch)
    ctx.log(f"  data-parallel over {jax.device_count()} devices: each batch's full chunks "
            "dealt to the devices, the short ones collected and dealt one per device")
    return _data_parallel_streamed(criterion, loss_fn, stream, chunk, watch)


class PassWatcher:
    """The ``progress(kind, batches)`` of streamed scoring: a line about every tenth of a
    pass (batches done, time, the pass's remaining time) and, after every batch, the run's
    stop check, which raises :class:`Stopped` (every process calls it at the same batches)."""

    def __init__(self, ctx: Context, batches: int, passes: int) -> None:
        self.ctx, self.batches, self.passes = ctx, batches, passes
        self.every = max(1, batches // 10)
        self.started = time.perf_counter()  # a pass's clock starts where the last one ended

    def __call__(self, kind: str, done: int) -> None:
        now = time.perf_counter()
        pass_index = 1 if kind == "gradient" else 2
        name = f"pass {pass_index}/{self.passes} ({'g' if kind == 'gradient' else 'Hg'})"
        if done % self.every == 0 or done == self.batches:
            spent = now - self.started
            eta = spent / done * (self.batches - done)
            left = f", {format_duration(eta)} left in this pass" if done < self.batches else ""
            self.ctx.log(f"  scoring {name}: {done}/{self.batches} batches in "
                         f"{format_duration(spent)}{left}")
        if done == self.batches:
            self.started = now
        if (done < self.batches or pass_index < self.passes) and self.ctx.stop_requested():
            raise Stopped(f"scoring {name}, after batch {done} of {self.batches}")


def _device_groups(stream: Callable[[], Iterator[Batch]], chunk: int,
                   num_devices: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Every chunk of every batch, as ``[num_devices, ...]`` groups for one pmapped call,
    each with the number of batches read so far.

    Full chunks: each batch's, dealt (``deal_chunks``). Short last chunks:
    gathered over batches, ``num_devices`` at a time (the last group padded
    with weight-0 copies).
    """
    short: list[Batch] = []
    read = 0
    for batch in stream():
        read += 1
        n = len(batch["label"])
        full = n // chunk
        if full:
            yield (deal_chunks({k: v[:full * chunk] for k, v in batch.items()}, full,
                               num_devices), read)
        if n % chunk:
            short.append({k: v[full * chunk:] for k, v in batch.items()})
            if len(short) == num_devices:
                yield _stack(short, num_devices), read
                short = []
    if short:
        yield _stack(short, num_devices), read


def _stack(chunks: list[Batch], num_devices: int) -> dict[str, np.ndarray]:
    padded = chunks + [chunks[0]] * (num_devices - len(chunks))
    out = {k: np.stack([c[k] for c in padded]) for k in chunks[0]}
    size = len(chunks[0]["label"])
    out["weight"] = np.repeat((np.arange(num_devices) < len(chunks)).astype(np.float32),
                              size).reshape(num_devices, size)
    return out


def accumulation_step(kind: str, loss_fn: Callable, chunk: int, short: bool) -> Callable:
    """``(params, chunks, v, acc) -> acc + Σ`` of one ``kind`` ("gradient" or "hvp" along
    ``v``), pmapped over ``SCORE_AXIS``: each device's dealt full chunks of ``chunk``
    images, or (``short``) one short chunk each; params and v replicated by ``in_axes``.

    The core traces it at float32 matmul precision on every backend."""
    size = {"num_microbatches": 1} if short else {"microbatch_size": chunk}
    if kind == "gradient":
        fn = lambda p, c, v, acc: gj.accumulate.accumulate_gradient(
            p, loss_fn, c, acc, axis_name=SCORE_AXIS, **size)
    else:
        fn = lambda p, c, v, acc: gj.accumulate.accumulate_hvp(
            p, loss_fn, c, v, acc, axis_name=SCORE_AXIS, **size)
    return jax.pmap(fn, axis_name=SCORE_AXIS, in_axes=(None, 0, None, 0))


def _data_parallel_streamed(criterion: gj.criteria.Criterion, loss_fn: Callable,
                            stream: Callable[[], Iterator[Batch]], chunk: int,
                            progress: gj.streaming.Progress) -> Callable[[PyTree], PyTree]:
    devices = jax.devices()
    rows = [devices.index(d) for d in jax.local_devices()]
    programs: dict[tuple[str, bool], Callable] = {}

    def program(kind: str, short: bool) -> Callable:
        """The pmapped accumulation of one kind, for dealt full chunks or one short chunk each."""
        if (kind, short) not in programs:
            programs[kind, short] = accumulation_step(kind, loss_fn, chunk, short)
        return programs[kind, short]

    def one_pass(kind: str, params: PyTree, v: PyTree) -> PyTree:
        acc = jax_utils.replicate(jax.tree_util.tree_map(jnp.zeros_like, params))
        reported = dispatched = 0  # batches read when the last progress / group went out
        for group, read in _device_groups(stream, chunk, len(devices)):
            # As in grasp_jax.streaming: the last group's sum is done before the next goes out.
            jax.block_until_ready(acc)
            if dispatched > reported:
                reported = dispatched
                progress(kind, reported)
            short = group["label"].shape[1] < chunk
            acc = program(kind, short)(params, {k: x[rows] for k, x in group.items()}, v, acc)
            dispatched = read
        jax.block_until_ready(acc)
        if dispatched > reported:
            progress(kind, dispatched)
        return distributed.first_replica(acc)

    def score_fn(params: PyTree) -> PyTree:
        g = one_pass("gradient", params, None)
        hg = one_pass("hvp", params, g) if criterion.needs == "hvp" else None
        return gj.scoring.from_sums(criterion, params, g, hg)

    return score_fn
