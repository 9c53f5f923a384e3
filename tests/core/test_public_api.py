"""The public API: the top level a user calls, the submodules that hold the
building blocks, and the 0.2 names and keyword that still work, with a warning,
for one release."""

import configparser
import importlib
import pathlib
import warnings

import chex
import jax
import jax.numpy as jnp
import pytest

import grasp_jax as gj

ROOT = pathlib.Path(__file__).resolve().parents[2]

TOP_LEVEL = {
    "scores", "scores_from_batches", "grasp_abs_scores_from_batches",
    "grasp_scores", "grasp_abs_scores", "snip_scores", "synflow_scores", "magnitude_scores",
    "random_scores", "grasp_scores_from_batches", "snip_scores_from_batches", "gradient_and_hvp",
    "cross_entropy_with_temperature", "masks_from_scores", "nm_masks", "prune", "apply_masks",
    "sparsity_report", "masked_updates", "gradient_flow", "save_sparse", "load_sparse",
    "LayerCollapseWarning", "TieWarning", "GraspJaxDeprecationWarning",
}

# Every name that left the top level in 0.3, and the submodule that holds it now.
MOVED = {
    "ChunkLayout": "chunks", "chunk_layout": "chunks", "split_microbatches": "chunks",
    "accumulate_gradient": "accumulate", "accumulate_hvp": "accumulate",
    "default_memory_budget": "accumulate",
    "gradient_from_batches": "streaming", "gradient_and_hvp_from_batches": "streaming",
    "grasp_from_hvp": "scoring", "snip_from_gradient": "scoring",
    "default_is_prunable": "prunable", "merge_prunable": "prunable", "path_name": "prunable",
    "prunable_flags": "prunable", "split_prunable": "prunable",
    "PRUNE_DIRECTION": "criteria", "resolve_direction": "criteria",
    "erk_densities": "budgets",
    "LayerDensity": "masks", "SparsityReport": "masks",
    "MaskedUpdatesState": "optim",
    "sparsity_schedule": "pruning",
    "load_sparse_masks": "export",
    "inverted_direction": "ablations", "inverted_masks": "ablations",
    "reinitialized": "ablations", "shuffle_masks": "ablations",
}

SUBMODULES = ("ablations", "accumulate", "budgets", "chunks", "criteria", "diagnostics", "export",
              "masks", "optim", "prunable", "pruning", "scoring", "selection", "streaming",
              "structured", "nnx")


def test_the_top_level_is_what_a_user_calls_and_each_name_resolves():
    assert set(gj.__all__) == TOP_LEVEL
    assert len(gj.__all__) == len(TOP_LEVEL)  # no name twice
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these is deprecated
        for name in gj.__all__:
            assert getattr(gj, name) is not None, name
    assert issubclass(gj.GraspJaxDeprecationWarning, DeprecationWarning)


def test_star_import_gives_exactly_the_top_level():
    namespace = {}
    exec("from grasp_jax import *", namespace)
    assert set(namespace) - {"__builtins__"} == TOP_LEVEL


@pytest.mark.parametrize("name", SUBMODULES)
def test_each_public_submodule_lists_names_it_defines(name):
    module = importlib.import_module(f"grasp_jax.{name}")
    assert getattr(gj, name) is module  # reachable as gj.<name> after `import grasp_jax as gj`
    assert module.__all__, name
    for attr in module.__all__:
        assert hasattr(module, attr), f"grasp_jax.{name}.__all__ names missing {attr!r}"


def test_every_moved_name_has_a_home_that_exports_it():
    for name, home in MOVED.items():
        assert name in importlib.import_module(f"grasp_jax.{home}").__all__, (name, home)
        assert name not in gj.__all__


@pytest.mark.parametrize("name", sorted(MOVED))
def test_an_old_top_level_name_warns_and_is_its_new_home(name):
    new_home = f"grasp_jax.{MOVED[name]}"
    with pytest.warns(gj.GraspJaxDeprecationWarning, match=rf"use {new_home}\.{name}\b") as rec:
        old = getattr(gj, name)
    assert old is getattr(importlib.import_module(new_home), name)
    assert rec[0].filename == __file__  # the warning points at the caller's line


def test_from_import_of_an_old_name_warns_too():
    with pytest.warns(gj.GraspJaxDeprecationWarning, match="grasp_jax.chunks.ChunkLayout"):
        from grasp_jax import ChunkLayout
    assert ChunkLayout is gj.chunks.ChunkLayout


def test_an_unknown_name_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'grasp_scorez'"):
        gj.grasp_scorez  # noqa: B018


def scores_tree():
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    return {"a": {"kernel": jax.random.normal(keys[0], (8, 4))},
            "b": {"kernel": jax.random.normal(keys[1], (4, 8)), "bias": jnp.zeros(8)}}


@pytest.mark.parametrize("direction", ["highest", "lowest"])
def test_the_old_prune_keyword_warns_and_gives_the_same_masks(direction):
    scores = scores_tree()
    match = rf"prune= is deprecated.*direction={direction!r}"
    want = gj.masks_from_scores(scores, 0.5, direction=direction)
    with pytest.warns(gj.GraspJaxDeprecationWarning, match=match) as rec:
        old = gj.masks_from_scores(scores, 0.5, prune=direction)
    assert rec[0].filename == __file__
    chex.assert_trees_all_equal(old, want)

    with pytest.warns(gj.GraspJaxDeprecationWarning, match=match):
        old = gj.nm_masks(scores, 2, 4, prune=direction)
    chex.assert_trees_all_equal(old, gj.nm_masks(scores, 2, 4, direction=direction))

    with pytest.warns(gj.GraspJaxDeprecationWarning, match=match):
        old = gj.prune(scores, gj.magnitude_scores, 0.5, prune=direction, rounds=2)
    chex.assert_trees_all_equal(
        old, gj.prune(scores, gj.magnitude_scores, 0.5, direction=direction, rounds=2))

    with pytest.warns(gj.GraspJaxDeprecationWarning, match=match):
        old = gj.ablations.inverted_masks(scores, 0.5, prune=direction)
    chex.assert_trees_all_equal(old, gj.ablations.inverted_masks(scores, 0.5, direction=direction))

    with pytest.warns(gj.GraspJaxDeprecationWarning, match=match):
        assert gj.criteria.resolve_direction(prune=direction) == direction
    with pytest.warns(gj.GraspJaxDeprecationWarning, match=match):
        assert gj.ablations.inverted_direction(prune=direction) != direction


def test_prune_and_direction_both_given_must_agree():
    scores = scores_tree()
    calls = []

    def score_fn(p):
        calls.append(1)
        return gj.magnitude_scores(p)

    contradiction = "direction='highest' contradicts the deprecated prune='lowest'"
    for call in (
        lambda: gj.masks_from_scores(scores, 0.5, direction="highest", prune="lowest"),
        lambda: gj.nm_masks(scores, 2, 4, direction="highest", prune="lowest"),
        lambda: gj.prune(scores, score_fn, 0.5, direction="highest", prune="lowest"),
        lambda: gj.ablations.inverted_masks(scores, 0.5, direction="highest", prune="lowest"),
        lambda: gj.criteria.resolve_direction("highest", prune="lowest"),
    ):
        with pytest.raises(ValueError, match=contradiction):
            call()
    assert calls == []  # refused before any scoring
    with pytest.warns(gj.GraspJaxDeprecationWarning):  # agreeing: accepted, still deprecated
        both = gj.masks_from_scores(scores, 0.5, direction="highest", prune="highest")
    chex.assert_trees_all_equal(both, gj.masks_from_scores(scores, 0.5, direction="highest"))


def test_the_version_is_0_3_and_setup_cfg_agrees():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["metadata"]["version"] == gj.__version__ == "0.3.0"


def test_the_projects_own_deprecations_are_errors_under_pytest():
    # setup.cfg turns the warning into an error, so no caller in the project can keep
    # using an old name or keyword unnoticed.
    with pytest.raises(gj.GraspJaxDeprecationWarning):
        gj.masks_from_scores(scores_tree(), 0.5, prune="lowest")
