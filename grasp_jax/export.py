"""Sparse export: a pruned model's kept weights in one ``.npz``, and the loader back.

Each prunable leaf is stored as its kept values plus where they sit, in
whichever of two encodings is smaller for that leaf:

- ``"indices"``: the flat (row-major) indices of the kept entries, int32
  (int64 for leaves of 2^31 entries or more) — 4 bytes per kept weight;
- ``"bitmask"``: the mask itself, packed 8 entries a byte (``np.packbits``)
  — N/8 bytes whatever the density, smaller above 1/32 density.

Non-prunable leaves (biases, BatchNorm) are stored whole (unless their
masks prune something). Values are stored
as their raw bytes with the dtype's name beside them, so every dtype
(bfloat16 included) comes back bit for bit. A JSON header (``__meta__``)
holds each leaf's key path, shape, dtype and encoding, so that plain nested
dicts (Linen params) are rebuilt without any other input; other pytrees
(NNX ``State``, tuples) are rebuilt into the structure of ``like=``.

Pruned entries load as +0.0, exactly what :func:`grasp_jax.apply_masks` gives.

Integrity (format version 2): the header holds the SHA-256 of every stored
array's bytes and of the header itself, and the loader checks them, so one
flipped byte anywhere in the file is an error naming the file and the array,
never silently different weights. Version-1 files (no digests) still load.
Anything else that is not such an artifact (empty, text, truncated, an
``.npz`` written by something else) is one ``ValueError`` naming the file and
what is wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax.masks import check_same_structure
from grasp_jax.prunable import PrunableSpec, path_name, prunable_flags

PyTree = Any
FORMAT = "grasp_jax.sparse"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no digests
_ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive

__all__ = ["load_sparse", "load_sparse_masks", "save_sparse"]


def _key_entry(key: Any) -> list:
    if isinstance(key, jax.tree_util.DictKey):
        return ["dict", key.key]
    if isinstance(key, jax.tree_util.SequenceKey):
        return ["seq", key.idx]
    if isinstance(key, jax.tree_util.GetAttrKey):
        return ["attr", key.name]
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return ["flat", key.key]
    return ["other", str(key)]


def _encode_leaf(i: int, value: np.ndarray, keep: np.ndarray | None) -> tuple[dict, dict]:
    """(arrays for the .npz, the leaf's header) for leaf ``i``."""
    if keep is None:
        return {f"leaf{i}.values": np.ascontiguousarray(value).reshape(-1).view(np.uint8)}, {
            "encoding": "dense"
        }
    flat_keep = keep.reshape(-1)
    kept = np.ascontiguousarray(value.reshape(-1)[flat_keep]).view(np.uint8)
    index_dtype = np.int32 if value.size < 2**31 else np.int64
    n_kept = int(flat_keep.sum())
    if n_kept * np.dtype(index_dtype).itemsize <= (value.size + 7) // 8:
        where = {f"leaf{i}.indices": np.flatnonzero(flat_keep).astype(index_dtype)}
        return {f"leaf{i}.values": kept, **where}, {"encoding": "indices", "kept": n_kept}
    where = {f"leaf{i}.bitmask": np.packbits(flat_keep)}
    return {f"leaf{i}.values": kept, **where}, {"encoding": "bitmask", "kept": n_kept}


def save_sparse(
    path: str | os.PathLike,
    params: PyTree,
    masks: PyTree,
    *,
    prunable: PrunableSpec = None,
    compress: bool = False,
) -> int:
    """Write ``params ⊙ masks`` to ``path`` (an ``.npz``): prunable leaves sparse, the rest
    dense. Returns the file's size in bytes.

    ``compress=True`` deflates the arrays as well (``np.savez_compressed``).
    """
    check_same_structure(masks, params)
    flags = prunable_flags(params, prunable)
    named = jax.tree_util.tree_flatten_with_path(params)[0]
    host = jax.device_get([x for _, x in named])
    host_masks = jax.device_get(jax.tree_util.tree_leaves(masks))
    arrays, leaves = {}, []
    for i, ((key_path, _), value, keep, flag) in enumerate(zip(named, host, host_masks, flags)):
        value, keep = np.asarray(value), np.asarray(keep, bool)
        # Prunable leaves are sparse; so is any other whose mask prunes something,
        # so that loading always gives exactly apply_masks(params, masks).
        data, header = _encode_leaf(i, value, keep if flag or not keep.all() else None)
        arrays.update(data)
        leaves.append({"path": [_key_entry(k) for k in key_path], "name": path_name(key_path),
                       "shape": list(value.shape), "dtype": str(value.dtype), **header})
    meta = {"format": FORMAT, "version": VERSION, "leaves": leaves,
            "sha256": {name: _digest(a) for name, a in arrays.items()}}
    meta["header_sha256"] = _header_digest(meta)
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
        (np.savez_compressed if compress else np.savez)(f, __meta__=np.array(json.dumps(meta)),
                                                         **arrays)
    return os.path.getsize(path)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _header_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class _NotAnArtifact(Exception):
    """What makes a file unreadable as a sparse artifact (turned into one ValueError)."""


def _read(path: str | os.PathLike) -> tuple[list[dict], dict]:
    """(leaf headers, arrays) of a checked artifact; ValueError naming ``path`` and
    what is wrong for anything :func:`save_sparse` did not write intact."""
    try:
        return _read_checked(path)
    except _NotAnArtifact as e:
        raise ValueError(f"{os.fspath(path)} is not a readable sparse artifact of "
                         f"save_sparse: {e}") from None


def _read_checked(path: str | os.PathLike) -> tuple[list[dict], dict]:
    with open(path, "rb") as f:  # FileNotFoundError etc. already name the file
        head = f.read(len(_ZIP_MAGIC))
    if not head:
        raise _NotAnArtifact("the file is empty")
    if head != _ZIP_MAGIC:
        raise _NotAnArtifact(f"it is not an .npz (zip) file (it starts with {head!r})")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "__meta__" not in data.files:
                raise _NotAnArtifact(f"it has no __meta__ header (arrays {data.files[:5]}): "
                                     "an .npz written by something else")
            meta = json.loads(str(data["__meta__"]))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT or \
                    meta.get("version") not in READABLE_VERSIONS:
                found = meta if not isinstance(meta, dict) else (meta.get("format"),
                                                                 meta.get("version"))
                raise _NotAnArtifact(f"its header is not {FORMAT} version "
                                     f"{'/'.join(map(str, READABLE_VERSIONS))} (found "
                                     f"{found!r})")
            arrays = {k: data[k] for k in data.files if k != "__meta__"}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
        raise _NotAnArtifact(f"it is damaged ({type(e).__name__}: {e})") from None
    if meta["version"] >= 2:
        _check_digests(meta, arrays)
    return meta["leaves"], arrays


def _check_digests(meta: dict, arrays: dict) -> None:
    if meta.get("header_sha256") != _header_digest(meta):
        raise _NotAnArtifact("its header fails its SHA-256 check (the file is damaged)")
    expected = meta.get("sha256", {})
    if set(expected) != set(arrays):
        raise _NotAnArtifact(f"it holds arrays {sorted(arrays)[:8]}, its header lists "
                             f"{sorted(expected)[:8]}")
    for name, array in arrays.items():
        if _digest(array) != expected[name]:
            raise _NotAnArtifact(f"array {name} fails its SHA-256 check (the file is damaged)")


def _decode_leaf(i: int, leaf: dict, arrays: dict) -> tuple[np.ndarray, np.ndarray]:
    """(value, keep-mask) of leaf ``i``."""
    dtype, shape = jnp.dtype(leaf["dtype"]), tuple(leaf["shape"])
    size = int(np.prod(shape, dtype=np.int64))
    values = arrays[f"leaf{i}.values"].view(dtype)
    if leaf["encoding"] == "dense":
        return values.reshape(shape), np.ones(shape, bool)
    if leaf["encoding"] == "indices":
        keep = np.zeros(size, bool)
        keep[arrays[f"leaf{i}.indices"]] = True
    else:
        keep = np.unpackbits(arrays[f"leaf{i}.bitmask"], count=size).astype(bool)
    dense = np.zeros(size, dtype)
    dense[keep] = values
    return dense.reshape(shape), keep.reshape(shape)


def _rebuild(leaves: list[dict], values: list[np.ndarray], like: PyTree | None) -> PyTree:
    if like is not None:
        named, treedef = jax.tree_util.tree_flatten_with_path(like)
        names = [path_name(p) for p, _ in named]
        if names != [leaf["name"] for leaf in leaves]:
            raise ValueError(f"`like` has leaves {names[:8]}..., the file "
                             f"{[leaf['name'] for leaf in leaves][:8]}...")
        for (p, x), v in zip(named, values):
            if tuple(np.shape(x)) != v.shape:
                raise ValueError(f"{path_name(p)}: `like` has shape {np.shape(x)}, the file "
                                 f"{v.shape}")
        return jax.tree_util.tree_unflatten(treedef, values)
    root: dict = {}
    for leaf, value in zip(leaves, values):
        kinds = {kind for kind, _ in leaf["path"]}
        if not leaf["path"] or kinds != {"dict"}:
            raise ValueError(f"{leaf['name']} is not in a plain nested dict (its keys: "
                             f"{leaf['path']}); pass like= with the tree's structure")
        node = root
        for _, key in leaf["path"][:-1]:
            node = node.setdefault(key, {})
        node[leaf["path"][-1][1]] = value
    return root


def load_sparse(path: str | os.PathLike, *, like: PyTree | None = None) -> PyTree:
    """The dense params written by :func:`save_sparse` (numpy arrays, pruned entries +0.0).

    Nested dicts are rebuilt from the stored key paths; for any other pytree
    pass ``like`` (the params, or ``jax.eval_shape`` of their initializer),
    whose structure, leaf names and shapes must match the file.
    """
    leaves, arrays = _read(path)
    return _rebuild(leaves, [_decoded(path, i, leaf, arrays)[0] for i, leaf in enumerate(leaves)],
                    like)


def load_sparse_masks(path: str | os.PathLike, *, like: PyTree | None = None) -> PyTree:
    """The keep-masks stored by :func:`save_sparse` (non-prunable leaves all ``True``)."""
    leaves, arrays = _read(path)
    return _rebuild(leaves, [_decoded(path, i, leaf, arrays)[1] for i, leaf in enumerate(leaves)],
                    like)


def _decoded(path: str | os.PathLike, i: int, leaf: dict, arrays: dict
             ) -> tuple[np.ndarray, np.ndarray]:
    # A version-1 file has no digests: inconsistent arrays show up here, named.
    try:
        return _decode_leaf(i, leaf, arrays)
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"{os.fspath(path)}: leaf {leaf.get('name', i)!r} cannot be decoded "
                         f"({type(e).__name__}: {e}); the file is damaged") from None
