"""Scores streamed from a restartable stream of batches equal the scores of the whole set."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grasp_jax as gj

from tests.helpers.tiny_models import (
    convbn_setup,
    counted_stream,
    cut,
    explicit_over_chunks,
    make_batch,
    mlp_loss,
    mlp_params,
    prunable_vector,
)


def test_grasp_from_batches_equals_grasp_on_the_concatenation_in_two_passes():
    with jax.enable_x64(True):
        params, loss, batch = convbn_setup(n=12)
        make_batches, calls = counted_stream(batch, 6)  # 2 batches of 6, chunks of 3
        streamed = gj.grasp_scores_from_batches(params, loss, make_batches, microbatch_size=3)
        assert len(calls) == 2  # one pass for g, one for Hg
        whole = gj.grasp_scores(params, loss, batch, microbatch_size=3)
        np.testing.assert_allclose(prunable_vector(streamed), prunable_vector(whole),
                                   rtol=1e-9, atol=1e-13)
        assert np.abs(prunable_vector(whole)).max() > 0
        make_batches, calls = counted_stream(batch, 6)
        snip = gj.snip_scores_from_batches(params, loss, make_batches, microbatch_size=3)
        assert len(calls) == 1
        np.testing.assert_allclose(
            prunable_vector(snip),
            prunable_vector(gj.snip_scores(params, loss, batch, microbatch_size=3)), rtol=1e-10)


def test_streamed_ragged_chunks_match_explicit_per_chunk_sums():
    with jax.enable_x64(True):
        params = mlp_params(jax.random.PRNGKey(3), dtype=jnp.float64)
        batch = make_batch(jax.random.PRNGKey(4), n=10, dtype=jnp.float64)
        make_batches, _ = counted_stream(batch, 5)  # each batch of 5 in chunks 2 + 2 + 1
        theta, g, hg = explicit_over_chunks(params, mlp_loss, cut(batch, [2, 2, 1, 2, 2, 1]))
        g_tree, hg_tree = gj.streaming.gradient_and_hvp_from_batches(params, mlp_loss, make_batches,
                                                           microbatch_size=2)
        np.testing.assert_allclose(prunable_vector(g_tree), g, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(prunable_vector(hg_tree), hg, rtol=1e-9, atol=1e-13)


def test_progress_reports_every_batch_of_each_pass_and_changes_no_score():
    with jax.enable_x64(True):
        params, loss, batch = convbn_setup(n=12)
        make_batches, _ = counted_stream(batch, 4)  # 3 batches of 4
        seen = []
        watched = gj.grasp_scores_from_batches(params, loss, make_batches, microbatch_size=2,
                                               progress=lambda kind, n: seen.append((kind, n)))
        assert seen == [("gradient", 1), ("gradient", 2), ("gradient", 3),
                        ("hvp", 1), ("hvp", 2), ("hvp", 3)]
        plain = gj.grasp_scores_from_batches(params, loss, make_batches, microbatch_size=2)
        np.testing.assert_array_equal(prunable_vector(watched), prunable_vector(plain))
        seen.clear()
        gj.snip_scores_from_batches(params, loss, make_batches, microbatch_size=2,
                                    progress=lambda kind, n: seen.append((kind, n)))
        assert seen == [("gradient", 1), ("gradient", 2), ("gradient", 3)]


def test_a_raising_progress_abandons_the_stream_at_that_batch():
    params, loss, batch = convbn_setup(n=12)
    yielded = []

    def make_batches():
        for i, b in enumerate(cut(batch, [2] * 6)):
            yielded.append(i)
            yield b

    def stop_after_two(kind, n):
        if n == 2:
            raise KeyboardInterrupt(kind)

    with pytest.raises(KeyboardInterrupt, match="gradient"):
        gj.grasp_scores_from_batches(params, loss, make_batches, progress=stop_after_two)
    assert yielded == [0, 1, 2]  # the third batch was read, never summed


class _Pending:
    """A stand-in for an accumulator still being computed: records when it is waited for."""

    def __init__(self, events, i):
        self.events, self.i = events, i

    def block_until_ready(self):
        self.events.append(f"wait {self.i}")
        return self


def test_each_batch_is_summed_before_the_next_is_dispatched(monkeypatch):
    """JAX dispatches asynchronously: without the wait, a device slower than the stream would
    queue every batch the stream yields, all held in memory at once."""
    events = []

    def fake_accumulate(params, loss_fn, batch, acc, **opts):
        events.append(f"dispatch {batch}")
        return _Pending(events, batch)

    def make_batches():
        for i in range(3):
            events.append(f"read {i}")
            yield i

    monkeypatch.setattr(gj.streaming, "accumulate_gradient", fake_accumulate)
    gj.streaming.gradient_from_batches({}, None, make_batches)
    assert events == ["read 0", "dispatch 0", "read 1", "wait 0", "dispatch 1",
                      "read 2", "wait 1", "dispatch 2", "wait 2"]


def test_an_empty_stream_is_an_error():
    params = mlp_params(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="yielded no batch"):
        gj.grasp_scores_from_batches(params, mlp_loss, lambda: iter([]))


def test_data_parallel_streaming_is_a_loop_of_the_mapped_primitives():
    """The runner's recipe: map accumulate_gradient/accumulate_hvp over devices
    (here a named vmap axis of 2; pmap the same way) and loop over the stream."""
    with jax.enable_x64(True):
        params, loss, batch = convbn_setup(n=12)
        opts = dict(microbatch_size=3, axis_name="d")
        add_g = jax.vmap(
            lambda b, acc: gj.accumulate.accumulate_gradient(params, loss, b, acc, **opts),
            axis_name="d")
        add_hg = jax.vmap(
            lambda b, g, acc: gj.accumulate.accumulate_hvp(params, loss, b, g, acc, **opts),
            axis_name="d")
        # 2 batches of 6 per step, dealt 3 + 3 to the two devices.
        stream = [jax.tree_util.tree_map(lambda x: x.reshape((2, 3) + x.shape[1:]), b)
                  for b in cut(batch, [6, 6])]
        zeros = jax.tree_util.tree_map(lambda x: jnp.zeros((2,) + x.shape, x.dtype), params)
        g = zeros
        for b in stream:
            g = add_g(b, g)
        hg = zeros
        for b in stream:
            hg = add_hg(b, g, hg)
        scores = gj.scoring.grasp_from_hvp(params, jax.tree_util.tree_map(lambda x: x[1], hg))
        whole = gj.grasp_scores(params, loss, batch, microbatch_size=3)
        np.testing.assert_allclose(prunable_vector(scores), prunable_vector(whole),
                                   rtol=1e-9, atol=1e-13)
