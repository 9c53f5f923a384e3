"""Cutting a batch into consecutive chunks, each its own forward pass.

GraSP's reference code feeds its scoring batches to the network in chunks
(two halves of 50 CIFAR images; chunks of 20 of a 250-image ImageNet batch,
the last one 10), and BatchNorm in training mode normalizes each chunk by its
own statistics. A :class:`ChunkLayout` says how a batch is cut; the functions
below sum a per-chunk quantity over the chunks inside a trace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax.platforms import traced_platform

PyTree = Any

__all__ = ["ChunkLayout", "chunk_layout", "split_microbatches"]


class ChunkLayout(NamedTuple):
    """``count`` chunks of ``size`` examples, then one of ``last`` (0: none).

    Hashable, so it can be a static argument of a jitted function.
    """

    size: int
    count: int
    last: int = 0

    @property
    def num_chunks(self) -> int:
        return self.count + (1 if self.last else 0)

    @property
    def batch_size(self) -> int:
        return self.size * self.count + self.last


def _shape(x: Any) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def batch_size(batch: PyTree) -> int:
    """The leading (batch) axis shared by every leaf; a ValueError when there is none."""
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("batch has no arrays")
    sizes = {_shape(x)[0] if _shape(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "every leaf of batch needs the same leading (batch) axis; got sizes "
            f"{sorted(map(str, sizes))}"
        )
    return int(sizes.pop())


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def chunk_layout(batch: PyTree, *, num_microbatches: int | None = None,
                 microbatch_size: int | None = None) -> ChunkLayout:
    """How ``batch`` is cut: ``num_microbatches`` equal chunks, or chunks of
    ``microbatch_size`` with a shorter last one (250 by 20: 12 x 20 + 10).

    Neither: the batch is one chunk. Both, a size outside [1, batch size] or a
    count that does not divide the batch: a ValueError naming the values.
    """
    size = batch_size(batch)
    if num_microbatches is not None and microbatch_size is not None:
        raise ValueError(
            "give num_microbatches or microbatch_size, not both; got "
            f"num_microbatches={num_microbatches!r}, microbatch_size={microbatch_size!r}"
        )
    if microbatch_size is not None:
        m = _positive_int(microbatch_size, "microbatch_size")
        if m > size:
            raise ValueError(f"microbatch_size={m} is larger than the batch ({size} examples)")
        return ChunkLayout(m, size // m, size % m)
    k = 1 if num_microbatches is None else _positive_int(num_microbatches, "num_microbatches")
    if size % k:
        raise ValueError(f"batch size {size} is not divisible by num_microbatches={k}")
    return ChunkLayout(size // k, k)


def split_microbatches(batch: PyTree, num_microbatches: int) -> PyTree:
    """Reshape every leaf ``[B, ...]`` to ``[k, B // k, ...]`` (consecutive equal chunks)."""
    layout = chunk_layout(batch, num_microbatches=num_microbatches)
    return full_chunks(batch, layout)


def full_chunks(batch: PyTree, layout: ChunkLayout) -> PyTree:
    """The ``layout.count`` full chunks stacked: every leaf ``[count, size, ...]``."""
    n, k = layout.size, layout.count
    return jax.tree_util.tree_map(lambda x: jnp.reshape(x[:n * k], (k, n) + _shape(x)[1:]), batch)


def last_chunk(batch: PyTree, layout: ChunkLayout) -> PyTree | None:
    """The short last chunk, or None when every chunk is full."""
    if not layout.last:
        return None
    start = layout.size * layout.count
    return jax.tree_util.tree_map(lambda x: x[start:], batch)


def host_chunks(batch: PyTree, layout: ChunkLayout) -> Iterator[tuple[PyTree, ChunkLayout]]:
    """Each chunk as a slice of ``batch`` (host arrays stay on the host), with
    its own one-chunk layout."""
    sizes = [layout.size] * layout.count + ([layout.last] if layout.last else [])
    start = 0
    for n in sizes:
        chunk = jax.tree_util.tree_map(lambda x, a=start, b=start + n: x[a:b], batch)
        yield chunk, ChunkLayout(n, 1)
        start += n


def sum_over_chunks(fn: Callable[[PyTree], list], batch: PyTree, layout: ChunkLayout,
                    like: list) -> list:
    """Σ_c fn(chunk_c) inside a trace, one chunk after another.

    A ``lax.scan`` bounds memory by one chunk. XLA:CPU, however, runs
    convolutions inside a loop body ~30x slower than outside one (measured:
    ResNet-20 gradients, 4 chunks of 8, 17.5 s scanned vs 0.67 s unrolled), so
    in a program run on the CPU the loop is unrolled and XLA decides the order
    (``lax.platform_dependent``: the platform the program is lowered for picks
    it, so a program exported for a GPU or TPU keeps its loop). A short last
    chunk has another shape, so it is added after the loop.
    """
    if layout.count == 1 and not layout.last:
        return list(fn(batch))

    def body(acc, chunk):
        return [a + v for a, v in zip(acc, fn(chunk))], None

    zeros = [jnp.zeros_like(x) for x in like]
    chunks = full_chunks(batch, layout)

    def loop(unroll: bool) -> Callable[[list, PyTree], list]:
        return lambda init, xs: jax.lax.scan(body, init, xs, unroll=unroll)[0]

    traced_for = traced_platform()
    if traced_for is not None:  # inside a program traced once per platform
        total = loop(traced_for == "cpu")(zeros, chunks)
    else:
        total = jax.lax.platform_dependent(zeros, chunks, cpu=loop(True), default=loop(False))
    rest = last_chunk(batch, layout)
    return total if rest is None else [a + v for a, v in zip(total, fn(rest))]


def sum_loss_over_chunks(loss: Callable[[PyTree], jax.Array], batch: PyTree,
                         layout: ChunkLayout) -> jax.Array:
    """Σ_c loss(chunk_c), every chunk in one pass: the full chunks ``vmap``-ed
    (each still its own batch for BatchNorm), the short last one beside them.

    Differentiating this sum keeps the residuals of every chunk at once: the
    memory of one pass over the whole batch, at the FLOPs of one pass.
    """
    if layout.count == 1 and not layout.last:
        return loss(batch)
    total = jnp.sum(jax.vmap(loss)(full_chunks(batch, layout)))
    rest = last_chunk(batch, layout)
    return total if rest is None else total + loss(rest)
