"""grasp_jax.criteria: each criterion one entry; the generic scores are the named ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grasp_jax as gj
from grasp_jax import criteria

from tests.helpers.tiny_models import convbn_setup, counted_stream, prunable_vector


def _theta_sq_abs_g(params, g, hg, flags):
    return criteria.theta_map(lambda t, v: t * t * jnp.abs(v), params, g, flags)


def test_every_criterion_is_one_entry_and_the_directions_are_a_read_only_view():
    assert set(criteria.CRITERIA) >= {"grasp", "grasp_abs", "snip", "synflow", "magnitude",
                                      "random"}
    needs = {name: c.needs for name, c in criteria.CRITERIA.items()}
    assert (needs["grasp"], needs["grasp_abs"], needs["snip"]) == ("hvp", "hvp", "gradient")
    assert {needs[n] for n in ("synflow", "magnitude", "random")} == {"none"}
    assert dict(criteria.PRUNE_DIRECTION) == {n: c.direction for n, c in criteria.CRITERIA.items()}
    with pytest.raises(TypeError):
        criteria.PRUNE_DIRECTION["grasp"] = "lowest"
    with pytest.raises(TypeError):
        criteria.CRITERIA["grasp"] = criteria.CRITERIA["snip"]
    with pytest.raises(ValueError, match="from_sums is required"):
        criteria.Criterion("half", "lowest", "gradient")
    with pytest.raises(ValueError, match="needs"):
        criteria.Criterion("half", "lowest", "hessian", _theta_sq_abs_g)


def test_a_registered_criterion_is_scored_in_memory_and_streamed_and_named_by_direction():
    toy = criteria.Criterion("test_theta_sq_abs_g", "highest", "gradient", _theta_sq_abs_g)
    criteria.register(toy)
    try:
        assert criteria.PRUNE_DIRECTION[toy.name] == "highest"
        assert criteria.resolve_direction(criterion=toy.name) == "highest"
        with jax.enable_x64(True):
            params, loss, batch = convbn_setup(n=12)
            g = gj.scoring.gradient_and_hvp(params, loss, batch, microbatch_size=3)[0]
            theta = prunable_vector(params)
            want = theta * theta * np.abs(prunable_vector(g))
            got = gj.scores(toy.name, params, loss, batch, microbatch_size=3)
            np.testing.assert_allclose(prunable_vector(got), want, rtol=1e-10)
            make_batches, calls = counted_stream(batch, 6)
            streamed = gj.scores_from_batches(toy, params, loss, make_batches, microbatch_size=3)
            assert len(calls) == 1  # only g: one pass
            np.testing.assert_allclose(prunable_vector(streamed), want, rtol=1e-9)
            assert np.abs(want).max() > 0
    finally:
        criteria._CRITERIA.pop(toy.name)
    assert toy.name not in criteria.PRUNE_DIRECTION


def test_the_named_scores_are_the_generic_ones_bit_for_bit():
    params, loss, batch = convbn_setup(n=12, dtype=jnp.float32)
    for name, named in (("grasp", gj.grasp_scores), ("grasp_abs", gj.grasp_abs_scores),
                        ("snip", gj.snip_scores)):
        a = prunable_vector(gj.scores(name, params, loss, batch, microbatch_size=3))
        b = prunable_vector(named(params, loss, batch, microbatch_size=3))
        np.testing.assert_array_equal(a, b, err_msg=name)
        assert np.abs(a).max() > 0


def test_grasp_abs_over_batches_is_grasp_abs_of_the_concatenation_in_two_passes():
    with jax.enable_x64(True):
        params, loss, batch = convbn_setup(n=12)
        make_batches, calls = counted_stream(batch, 6)
        streamed = gj.grasp_abs_scores_from_batches(params, loss, make_batches, microbatch_size=3)
        assert len(calls) == 2
        whole = gj.grasp_abs_scores(params, loss, batch, microbatch_size=3)
        np.testing.assert_allclose(prunable_vector(streamed), prunable_vector(whole),
                                   rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(
            prunable_vector(streamed),
            np.abs(prunable_vector(gj.grasp_scores(params, loss, batch, microbatch_size=3))),
            rtol=1e-9, atol=1e-13)


def test_a_data_free_criterion_is_not_scored_from_data():
    params, loss, batch = convbn_setup(n=12, dtype=jnp.float32)
    with pytest.raises(ValueError, match="data-free"):
        gj.scores("magnitude", params, loss, batch)
    with pytest.raises(ValueError, match="unknown criterion"):
        gj.scores("nonesuch", params, loss, batch)
