"""The library's mask functions name a leaf of the wrong dtype or shape by its path."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grasp_jax as gj
from grasp_jax import optim, structured
from grasp_jax.masks import apply_masks, sparsity_report

PARAMS = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
MASKS = {"dense": {"kernel": jnp.ones((8, 4), bool), "bias": jnp.ones(4, bool)}}


def _with(tree, leaf):
    return {"dense": {**tree["dense"], "kernel": leaf}}


@pytest.mark.parametrize("bad", [np.array(["a"] * 32).reshape(8, 4),
                                 jnp.ones((8, 4), jnp.complex64), [[1] * 4] * 8])
def test_apply_masks_names_a_mask_leaf_of_the_wrong_dtype(bad):
    with pytest.raises(TypeError, match=r"masks leaf 'dense/kernel'"):
        apply_masks(PARAMS, _with(MASKS, bad) if not isinstance(bad, list) else
                    _with(MASKS, np.array(bad, object)))


def test_apply_masks_names_a_leaf_of_the_wrong_shape():
    with pytest.raises(ValueError, match="dense/kernel"):
        apply_masks(PARAMS, _with(MASKS, jnp.ones((4, 8), bool)))


def test_masked_updates_names_a_mask_leaf_of_the_wrong_dtype_and_shape():
    with pytest.raises(TypeError, match=r"masks leaf 'dense/kernel'"):
        optim.masked_updates(_with(MASKS, jnp.ones((8, 4), jnp.complex64)))
    tx = optax.chain(optax.sgd(0.1), optim.masked_updates(_with(MASKS, jnp.ones((4, 8), bool))))
    with pytest.raises(ValueError, match="dense/kernel"):
        tx.init(PARAMS)


def test_sparsity_report_names_a_mask_leaf_of_the_wrong_dtype():
    with pytest.raises(TypeError, match=r"masks leaf 'dense/kernel'"):
        sparsity_report(_with(MASKS, np.array([["x"] * 4] * 8)))
    assert sparsity_report(MASKS).kept == 32  # a good tree still passes


def test_nm_masks_names_a_score_or_mask_leaf_of_the_wrong_dtype():
    scores = {"dense": {"kernel": jnp.arange(32.0).reshape(8, 4), "bias": jnp.zeros(4)}}
    with pytest.raises(TypeError, match=r"scores leaf 'dense/kernel'"):
        structured.nm_masks(_with(scores, jnp.ones((8, 4), bool)), 2, 4, direction="lowest")
    with pytest.raises(TypeError, match=r"masks leaf 'dense/kernel'"):
        structured.nm_masks(scores, 2, 4, direction="lowest",
                            masks=_with(MASKS, jnp.ones((8, 4), jnp.complex64)))
    with pytest.raises(ValueError, match="dense/kernel"):
        structured.nm_masks(scores, 2, 4, direction="lowest",
                            masks=_with(MASKS, jnp.ones((4, 8), bool)))
    keep = structured.nm_masks(scores, 2, 4, direction="lowest")
    assert int(gj.sparsity_report(keep).kept) == 16
