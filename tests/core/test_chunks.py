"""Chunked scoring: ragged chunks, the in-memory and one-chunk-at-a-time paths,
eager, under jit and data-parallel, against explicit per-chunk sums in float64."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grasp_jax as gj

from tests.helpers.tiny_models import (
    convbn_setup,
    cut,
    explicit_over_chunks,
    make_batch,
    mlp_loss,
    mlp_params,
    prunable_vector,
)

# memory_budget_bytes=0 forces the one-chunk-at-a-time path; None lets the
# small test models take the path that linearizes every chunk at once.
PATHS = {"in_memory": None, "one_chunk_at_a_time": 0}


# Every test here compares against explicit float64 sums.
pytestmark = pytest.mark.usefixtures("x64")


@pytest.fixture(scope="module")
def ragged():
    """ConvBN on 10 examples in chunks of 4 + 4 + 2, with its explicit sums."""
    with jax.enable_x64(True):
        params, loss, batch = convbn_setup(n=10)
        return (params, loss, batch) + explicit_over_chunks(params, loss, cut(batch, [4, 4, 2]))


@pytest.mark.parametrize("path", sorted(PATHS))
def test_ragged_chunks_sum_per_chunk_computations_eager_and_jit(path, ragged):
    params, loss, batch, theta, g, hg = ragged
    opts = dict(microbatch_size=4, memory_budget_bytes=PATHS[path])
    g_tree, hg_tree = gj.gradient_and_hvp(params, loss, batch, **opts)
    np.testing.assert_allclose(prunable_vector(g_tree), g, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(prunable_vector(hg_tree), hg, rtol=1e-9, atol=1e-12)
    scores = prunable_vector(gj.grasp_scores(params, loss, batch, **opts))
    np.testing.assert_allclose(scores, -theta * hg, rtol=1e-9, atol=1e-12)
    jitted = jax.jit(lambda p, b: gj.grasp_scores(p, loss, b, **opts))(params, batch)
    np.testing.assert_allclose(prunable_vector(jitted), scores, rtol=1e-9, atol=1e-12)
    # The short chunk is its own BatchNorm batch: 4 + 4 + 2 is not 5 + 5.
    five = prunable_vector(gj.grasp_scores(params, loss, batch, num_microbatches=2))
    assert not np.allclose(scores, five, rtol=1e-3)


def test_ragged_snip_eager_and_jit(ragged):
    params, loss, batch, theta, g, _ = ragged
    snip = gj.snip_scores(params, loss, batch, microbatch_size=4)
    np.testing.assert_allclose(prunable_vector(snip), np.abs(theta * g), rtol=1e-9, atol=1e-14)
    snip_jit = jax.jit(lambda p, b: gj.snip_scores(p, loss, b, microbatch_size=4))(params, batch)
    np.testing.assert_allclose(prunable_vector(snip_jit), np.abs(theta * g), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_equal_chunks_take_either_path_to_the_same_scores(path):
    params, loss, batch = convbn_setup(n=8)
    theta, _, hg = explicit_over_chunks(params, loss, cut(batch, [2, 2, 2, 2]))
    s = gj.grasp_scores(params, loss, batch, num_microbatches=4, memory_budget_bytes=PATHS[path])
    np.testing.assert_allclose(prunable_vector(s), -theta * hg, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_data_parallel_ragged_chunks_sum_over_every_device(path):
    """Two 'devices' (a named vmap axis: psum behaves as under pmap), each with
    7 examples in chunks of 3 (3 + 3 + 1): the sums run over all six chunks."""
    params, loss, batch = convbn_setup(n=14)
    per_device = jax.tree_util.tree_map(lambda x: x.reshape((2, 7) + x.shape[1:]), batch)
    chunks = cut(jax.tree_util.tree_map(lambda x: x[:7], batch), [3, 3, 1]) + \
        cut(jax.tree_util.tree_map(lambda x: x[7:], batch), [3, 3, 1])
    theta, g, hg = explicit_over_chunks(params, loss, chunks)
    opts = dict(microbatch_size=3, axis_name="d")
    grasp = jax.vmap(lambda b: gj.grasp_scores(params, loss, b, memory_budget_bytes=PATHS[path],
                                               **opts), axis_name="d")(per_device)
    snip = jax.vmap(lambda b: gj.snip_scores(params, loss, b, **opts), axis_name="d")(per_device)
    for device in range(2):
        on_device = lambda t, d=device: prunable_vector(jax.tree_util.tree_map(lambda x: x[d], t))
        np.testing.assert_allclose(on_device(grasp), -theta * hg, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(on_device(snip), np.abs(theta * g), rtol=1e-9, atol=1e-14)


def test_accumulate_primitives_add_to_acc_and_pass_other_leaves_through():
    params = mlp_params(jax.random.PRNGKey(0), dtype=jnp.float64)
    batch = make_batch(jax.random.PRNGKey(1), n=10, dtype=jnp.float64)
    theta, g, hg = explicit_over_chunks(params, mlp_loss, cut(batch, [4, 4, 2]))
    acc = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.5), params)
    out = gj.accumulate.accumulate_gradient(params, mlp_loss, batch, acc, microbatch_size=4)
    np.testing.assert_allclose(prunable_vector(out), g + 0.5, rtol=1e-10)
    np.testing.assert_array_equal(out["dense0"]["bias"], 0.5)  # not θ: passed through
    g_tree = gj.accumulate.accumulate_gradient(params, mlp_loss, batch, microbatch_size=4)
    h_tree = gj.accumulate.accumulate_hvp(params, mlp_loss, batch, g_tree, microbatch_size=4)
    np.testing.assert_allclose(prunable_vector(h_tree), hg, rtol=1e-9, atol=1e-12)
    chex.assert_trees_all_equal_structs(h_tree, params)


def test_chunk_options_are_checked_with_the_values_named():
    params = mlp_params(jax.random.PRNGKey(0))
    batch = make_batch(jax.random.PRNGKey(1), n=8)
    with pytest.raises(ValueError, match="num_microbatches=2, microbatch_size=4"):
        gj.grasp_scores(params, mlp_loss, batch, num_microbatches=2, microbatch_size=4)
    with pytest.raises(ValueError, match="microbatch_size must be a positive integer, got 0"):
        gj.snip_scores(params, mlp_loss, batch, microbatch_size=0)
    with pytest.raises(ValueError, match=r"microbatch_size=9 is larger than the batch \(8 "):
        gj.gradient_and_hvp(params, mlp_loss, batch, microbatch_size=9)
    assert gj.chunks.chunk_layout(make_batch(jax.random.PRNGKey(2), n=250), microbatch_size=20) == \
        gj.chunks.ChunkLayout(size=20, count=12, last=10)


def lowered_programs(fn):
    """``fn()`` and the names of the programs it lowered (compiled, or read from a cache)."""
    names = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out = jax.block_until_ready(fn())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return out, names


def test_eager_chunked_grasp_is_one_program_traced_once_and_later_rounds_do_not_retrace(ragged):
    params, loss, batch, *_ = ragged
    traces = []

    def counted(p, b):
        traces.append(1)  # runs only while tracing
        return loss(p, b)

    # The full chunks are vmapped (one trace of the loss), a short last chunk adds one;
    # choosing the in-memory path by its residuals reuses that same trace. The program is
    # traced once for the CPU and once for the other platforms (grasp_jax.platforms).
    for microbatch_size, loss_traces in ((5, 2 * 1), (4, 2 * 2)):  # 5 + 5; ragged 4 + 4 + 2
        before = len(traces)
        scores, programs = lowered_programs(
            lambda m=microbatch_size: gj.grasp_scores(params, counted, batch, microbatch_size=m))
        assert len(programs) == 1, programs
        n_traces = len(traces)
        assert n_traces - before == loss_traces, (microbatch_size, n_traces - before)
        rescaled = jax.tree_util.tree_map(lambda x: 1.1 * x, params)
        again, programs = lowered_programs(
            lambda m=microbatch_size, p=rescaled: gj.grasp_scores(p, counted, batch,
                                                                  microbatch_size=m))
        assert programs == [] and len(traces) == n_traces, "a later round retraced"
        assert not np.allclose(prunable_vector(again), prunable_vector(scores))
    # One chunk at a time: a gradient and an HVP program per chunk shape, then no retrace.
    _, programs = lowered_programs(
        lambda: gj.grasp_scores(params, counted, batch, microbatch_size=5, memory_budget_bytes=0))
    n_traces = len(traces)
    assert sum(name == "jit(_add_chunk_sums)" for name in programs) == 2, programs
    _, programs = lowered_programs(
        lambda: gj.grasp_scores(params, counted, batch, microbatch_size=5, memory_budget_bytes=0))
    assert programs == [] and len(traces) == n_traces


def test_the_memory_budget_chooses_the_path_by_the_residual_estimate(ragged):
    from grasp_jax.accumulate import linearized_bytes, scoring_setup

    params, cached_loss, batch, *_ = ragged

    def loss(p, b):  # a new function: no program of the tests above is reused
        return cached_loss(p, b)

    def estimate(b):
        return linearized_bytes(params, b, scoring_setup(params, loss, b, num_microbatches=2))

    small = estimate(batch)
    large = estimate({k: jnp.concatenate([v, v]) for k, v in batch.items()})
    assert 0 < small < large  # residuals grow with the set
    _, programs = lowered_programs(lambda: gj.grasp_scores(params, loss, batch, num_microbatches=2,
                                                           memory_budget_bytes=small))
    assert programs == ["jit(_linearized_program)"], programs
    _, programs = lowered_programs(lambda: gj.grasp_scores(params, loss, batch, num_microbatches=2,
                                                           memory_budget_bytes=small - 1))
    assert "jit(_linearized_program)" not in programs, programs
    assert "jit(_add_chunk_sums)" in programs, programs


def _out_of_memory(*args, **kwargs):
    raise jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123456789 bytes.")


def test_a_program_that_does_not_fit_falls_back_to_one_chunk_at_a_time(ragged, monkeypatch):
    from grasp_jax import accumulate

    params, loss, batch, *_ = ragged
    one_at_a_time = gj.grasp_scores(params, loss, batch, microbatch_size=4,
                                    memory_budget_bytes=0)
    in_memory = gj.grasp_scores(params, loss, batch, microbatch_size=4)
    # The all-chunks program, chosen by the budget, runs out of memory (at compile or run).
    monkeypatch.setattr(accumulate, "_all_chunks_at_once", _out_of_memory)
    with pytest.warns(accumulate.MemoryBudgetWarning, match="one chunk at a time"):
        fallback = gj.grasp_scores(params, loss, batch, microbatch_size=4)
    chex.assert_trees_all_equal(fallback, one_at_a_time)
    np.testing.assert_allclose(prunable_vector(fallback), prunable_vector(in_memory),
                               rtol=1e-9, atol=1e-12)


def test_other_runtime_errors_of_the_all_chunks_program_are_not_hidden(ragged, monkeypatch):
    from grasp_jax import accumulate

    params, loss, batch, *_ = ragged

    def broken(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(accumulate, "_all_chunks_at_once", broken)
    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        gj.grasp_scores(params, loss, batch, microbatch_size=4)


class _Device:
    """A local device as default_memory_budget sees it."""

    def __init__(self, platform, stats):
        self.platform, self.id, self.device_kind, self._stats = platform, 0, "Fake v1", stats

    def memory_stats(self):
        return self._stats


def test_an_accelerator_without_a_memory_limit_gets_a_named_conservative_budget(monkeypatch):
    from grasp_jax import accumulate

    monkeypatch.setattr(accumulate, "_warned_devices", set())
    monkeypatch.setattr(jax, "local_devices", lambda: [_Device("tpu", None)])
    with pytest.warns(accumulate.MemoryBudgetWarning, match=r"tpu:0 \(Fake v1\).*no memory limit"):
        assert gj.accumulate.default_memory_budget() == accumulate.UNKNOWN_DEVICE_BUDGET
    # A device that reports its limit: half of what is free, no warning.
    monkeypatch.setattr(jax, "local_devices",
                        lambda: [_Device("cuda", {"bytes_limit": 10 * 2**30,
                                                  "bytes_in_use": 2 * 2**30})])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gj.accumulate.default_memory_budget() == 4 * 2**30
        # The CPU's memory is the host's: a quarter of RAM, no warning.
        monkeypatch.setattr(jax, "local_devices", lambda: [_Device("cpu", None)])
        assert gj.accumulate.default_memory_budget() > accumulate.UNKNOWN_DEVICE_BUDGET // 1024
