"""Sparse export: bit-exact round trips, both encodings, other pytrees, and the file size."""

import io

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import grasp_jax as gj


def params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {
        "conv": {"kernel": jax.random.normal(k[0], (3, 3, 16, 32))},
        "bn": {"scale": jnp.ones(32), "bias": jnp.zeros(32)},
        "dense": {"kernel": jax.random.normal(k[1], (288, 64)),
                  "bias": jax.random.normal(k[2], (64,))},
        "head": {"kernel": jax.random.normal(k[3], (64, 10)).astype(jnp.bfloat16)},
    }


def assert_bit_exact(got, want):
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    # Compared as bytes, so -0.0 and 0.0 (equal as numbers) differ.
    as_bytes = lambda tree: jax.tree_util.tree_map(lambda a: np.asarray(a).view(np.uint8), tree)
    chex.assert_trees_all_equal(as_bytes(got), as_bytes(want))


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_round_trip_is_bit_exact_and_smaller_than_dense(tmp_path, sparsity):
    p = params()
    masks = gj.masks_from_scores(gj.magnitude_scores(p), sparsity, criterion="magnitude")
    size = gj.save_sparse(tmp_path / "sparse.npz", p, masks)
    assert_bit_exact(gj.load_sparse(tmp_path / "sparse.npz"), gj.apply_masks(p, masks))
    assert_bit_exact(gj.export.load_sparse_masks(tmp_path / "sparse.npz"), masks)
    buf = io.BytesIO()
    np.savez(buf, **{gj.prunable.path_name(k): np.asarray(x)
                     for k, x in jax.tree_util.tree_flatten_with_path(p)[0]})
    dense = buf.getbuffer().nbytes
    print(f"sparsity {sparsity:.0%}: sparse {size:,} B, dense np.savez {dense:,} B "
          f"({size / dense:.1%})")
    if sparsity >= 0.9:
        assert size < dense / 4


def test_both_encodings_are_used_where_smaller(tmp_path):
    p = {"a": {"kernel": jnp.arange(1.0, 4097.0).reshape(64, 64)},
         "b": {"kernel": -jnp.arange(1.0, 4097.0).reshape(64, 64)}}
    masks = {"a": {"kernel": jnp.zeros((64, 64), bool).at[::17, ::9].set(True)},  # 1/153 kept
             "b": {"kernel": jnp.ones((64, 64), bool).at[0].set(False)}}  # bitmask wins
    gj.save_sparse(tmp_path / "s.npz", p, masks)
    with np.load(tmp_path / "s.npz") as data:
        assert "leaf0.indices" in data.files and "leaf1.bitmask" in data.files
    assert_bit_exact(gj.load_sparse(tmp_path / "s.npz"), gj.apply_masks(p, masks))
    # A mask on a leaf outside the prunable set is kept too.
    only_a = lambda path, x: gj.prunable.path_name(path) == "a/kernel"
    gj.save_sparse(tmp_path / "p.npz", p, masks, prunable=only_a)
    assert_bit_exact(gj.load_sparse(tmp_path / "p.npz"), gj.apply_masks(p, masks))
    size = gj.save_sparse(tmp_path / "c.npz", p, masks, compress=True)
    assert size < (tmp_path / "s.npz").stat().st_size


def test_other_pytrees_load_into_the_structure_of_like(tmp_path):
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 4, rngs=rngs)])

    state = nnx.state(MLP(nnx.Rngs(0)), nnx.Param)
    masks = gj.masks_from_scores(gj.magnitude_scores(state), 0.8, criterion="magnitude")
    gj.save_sparse(tmp_path / "nnx.npz", state, masks)
    with pytest.raises(ValueError, match="pass like="):
        gj.load_sparse(tmp_path / "nnx.npz")
    loaded = gj.load_sparse(tmp_path / "nnx.npz", like=state)
    assert_bit_exact(loaded, gj.apply_masks(state, masks))
    with pytest.raises(ValueError, match="`like` has leaves"):
        gj.load_sparse(tmp_path / "nnx.npz", like=params())


def test_a_file_of_another_kind_is_refused(tmp_path):
    np.savez(tmp_path / "x.npz", __meta__=np.array('{"format": "other"}'))
    with pytest.raises(ValueError, match="x.npz .*header is not grasp_jax.sparse version"):
        gj.load_sparse(tmp_path / "x.npz")
