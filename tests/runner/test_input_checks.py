"""The library's public functions check their inputs' types and name the leaf or the
file: integer weights, non-numeric scores, a sparsity that is not a real number,
and files that ``load_sparse`` cannot trust."""

import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grasp_jax as gj


def int_params():
    return {"a": {"kernel": jnp.ones((4, 3), jnp.int32)}, "b": {"kernel": jnp.ones((3, 2))}}


BATCH = {"x": jnp.ones((4, 4)), "y": jnp.zeros((4,), jnp.int32)}


def loss(p, b):
    return jnp.mean((b["x"] @ p["a"]["kernel"] @ p["b"]["kernel"]) ** 2)


@pytest.mark.parametrize("score", [
    lambda p: gj.grasp_scores(p, loss, BATCH),
    lambda p: gj.snip_scores(p, loss, BATCH),
    lambda p: gj.gradient_and_hvp(p, loss, BATCH),
    lambda p: gj.synflow_scores(p, lambda q, x: x @ q["a"]["kernel"] @ q["b"]["kernel"], (4,)),
    gj.magnitude_scores,
    lambda p: gj.random_scores(p, jax.random.PRNGKey(0)),
    lambda p: gj.prune(p, gj.magnitude_scores, 0.5, criterion="magnitude"),
    lambda p: gj.gradient_flow(p, loss, BATCH),
], ids=["grasp", "snip", "gradient_and_hvp", "synflow", "magnitude", "random", "prune",
        "gradient_flow"])
def test_an_integer_weight_is_refused_naming_its_leaf(score):
    with pytest.raises(TypeError, match="params leaf 'a/kernel' has dtype int32"):
        score(int_params())


@pytest.mark.parametrize("dtype", [jnp.bool_, jnp.complex64])
def test_scores_that_are_not_real_numbers_are_refused_naming_the_leaf(dtype):
    scores = {"a": {"kernel": jnp.ones((4, 3), dtype)}, "b": {"kernel": jnp.ones((3, 2))}}
    with pytest.raises(TypeError, match="scores leaf 'a/kernel' has dtype"):
        gj.masks_from_scores(scores, 0.5, criterion="magnitude")


def test_integer_scores_still_give_masks():
    scores = {"a": {"kernel": jnp.arange(12).reshape(4, 3)}}
    masks = gj.masks_from_scores(scores, 0.5, criterion="magnitude")
    assert int(masks["a"]["kernel"].sum()) == 6


@pytest.mark.parametrize("sparsity", ["0.5", b"0.5", True, 0.5 + 0j, None, [0.5]])
def test_a_sparsity_that_is_not_a_real_number_is_refused_naming_it(sparsity):
    scores = {"a": {"kernel": jnp.arange(12.0).reshape(4, 3)}}
    with pytest.raises(ValueError, match="sparsity must be a real number") as e:
        gj.masks_from_scores(scores, sparsity, criterion="magnitude")
    assert repr(sparsity) in str(e.value)


@pytest.mark.parametrize("sparsity", [0.5, np.float32(0.5), jnp.asarray(0.5), np.float64(0.5)])
def test_real_sparsities_of_every_kind_are_accepted(sparsity):
    scores = {"a": {"kernel": jnp.arange(12.0).reshape(4, 3)}}
    masks = gj.masks_from_scores(scores, sparsity, criterion="magnitude")
    assert int(masks["a"]["kernel"].sum()) == 6


# --------------------------------------------------------------------------
# load_sparse on files it did not write intact.


def _saved(tmp_path, compress=False):
    p = {"conv": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (3, 3, 4, 8))},
         "conv_b": {"bias": jnp.arange(8.0)}}
    masks = gj.masks_from_scores(gj.magnitude_scores(p), 0.7, criterion="magnitude")
    path = tmp_path / "sparse.npz"
    gj.save_sparse(path, p, masks, compress=compress)
    return path, gj.apply_masks(p, masks)


def _rewrite(path, change):
    """Rewrite the .npz with ``change(arrays)`` applied: a valid zip (its CRCs
    recomputed), so only the artifact's own digests can tell."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _refused(path, *needles):
    with pytest.raises(ValueError) as e:
        gj.load_sparse(path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_an_intact_artifact_loads_bit_for_bit(tmp_path):
    path, want = _saved(tmp_path)
    got = gj.load_sparse(path)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


@pytest.mark.parametrize("compress", [False, True])
def test_a_truncated_artifact_is_named(tmp_path, compress):
    path, _ = _saved(tmp_path, compress)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(path, "damaged")


def test_an_empty_file_is_named(tmp_path):
    path = tmp_path / "empty.npz"
    path.write_bytes(b"")
    _refused(path, "empty")


def test_a_text_file_is_named_without_a_word_about_pickles(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("these are not weights\n")
    _refused(path, "not an .npz")
    with pytest.raises(ValueError) as e:
        gj.load_sparse(path)
    assert "pickle" not in str(e.value)


def test_a_foreign_npz_is_named(tmp_path):
    path = tmp_path / "foreign.npz"
    np.savez(path, weights=np.ones(3))
    _refused(path, "no __meta__ header", "something else")


@pytest.mark.parametrize("compress", [False, True])
def test_one_flipped_byte_in_an_array_is_named(tmp_path, compress):
    path, _ = _saved(tmp_path, compress)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x20
    path.write_bytes(bytes(data))
    _refused(path)  # the zip's own CRC or the artifact's digest: either way, one line


def test_a_changed_array_with_a_valid_zip_fails_its_digest(tmp_path):
    path, _ = _saved(tmp_path)

    def flip(arrays):
        values = arrays["leaf0.values"].copy()
        values[len(values) // 2] ^= 0x01
        arrays["leaf0.values"] = values

    _rewrite(path, flip)
    _refused(path, "leaf0.values", "SHA-256")


def test_a_changed_header_fails_its_digest(tmp_path):
    path, _ = _saved(tmp_path)

    def reshape(arrays):
        meta = json.loads(str(arrays["__meta__"]))
        meta["leaves"][0]["shape"] = [3, 3, 8, 4]
        arrays["__meta__"] = np.array(json.dumps(meta))

    _rewrite(path, reshape)
    _refused(path, "header", "SHA-256")


def test_an_artifact_of_version_1_without_digests_still_loads(tmp_path):
    path, want = _saved(tmp_path)

    def version_1(arrays):
        meta = json.loads(str(arrays["__meta__"]))
        for key in ("sha256", "header_sha256"):
            del meta[key]
        meta["version"] = 1
        arrays["__meta__"] = np.array(json.dumps(meta))

    _rewrite(path, version_1)
    assert zipfile.is_zipfile(path)
    got = gj.load_sparse(path)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
