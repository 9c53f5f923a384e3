"""Tiny models and their explicit references, shared by the core's scoring tests.

The references build H_θθ with ``jax.hessian`` over the flat prunable vector, so
a test can hold the library's forward-over-reverse Hg against explicit math.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import grasp_jax as gj


def mlp_params(key, sizes=(6, 5, 4), dtype=jnp.float32, scale=1.0):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        k1, k2, key = jax.random.split(key, 3)
        params[f"dense{i}"] = {
            "kernel": scale * jax.random.normal(k1, (a, b), dtype) / np.sqrt(a),
            "bias": 0.3 * jax.random.normal(k2, (b,), dtype),
        }
    return params


def mlp_loss(params, batch, temperature=1.0):
    h = batch["x"]
    names = sorted(params)
    for i, name in enumerate(names):
        h = h @ params[name]["kernel"] + params[name]["bias"]
        if i < len(names) - 1:
            h = jnp.tanh(h)
    return gj.cross_entropy_with_temperature(h, batch["y"], temperature)


def make_batch(key, n=8, d=6, classes=4, dtype=jnp.float32):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (n, d), dtype),
            "y": jax.random.randint(ky, (n,), 0, classes)}


class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Conv(3, (3, 3), use_bias=False, param_dtype=x.dtype)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, param_dtype=x.dtype)(x)
        x = nn.relu(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(4, param_dtype=x.dtype)(x)


def convbn_setup(dtype=jnp.float64, n=8):
    model = ConvBN()
    key = jax.random.PRNGKey(1)
    x = jax.random.normal(key, (n, 5, 5, 2), dtype)
    y = jnp.arange(n) % 4
    variables = model.init(key, x)
    batch_stats = variables["batch_stats"]

    def loss(params, batch):
        logits, _ = model.apply(
            {"params": params, "batch_stats": batch_stats}, batch["x"], train=True,
            mutable=["batch_stats"],
        )
        return gj.cross_entropy_with_temperature(logits, batch["y"], 2.0)

    return variables["params"], loss, {"x": x, "y": y}


# --------------------------------------------------------------------------
# Explicit references: H_θθ built with jax.hessian over the flat prunable vector.


def explicit_g_hg(params, loss_fn, batch, num_microbatches=1):
    flags = gj.prunable.prunable_flags(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    theta = [x for x, f in zip(leaves, flags) if f]
    flat, unravel = ravel_pytree(theta)

    def loss_flat(v, chunk):
        it = iter(unravel(v))
        full = [next(it) if f else x for x, f in zip(leaves, flags)]
        return loss_fn(jax.tree_util.tree_unflatten(treedef, full), chunk)

    k = num_microbatches
    chunks = [jax.tree_util.tree_map(lambda a, i=i: a[i * len(a) // k:(i + 1) * len(a) // k], batch)
              for i in range(k)]
    grad, hess = jax.jit(jax.grad(loss_flat)), jax.jit(jax.hessian(loss_flat))
    g = sum(grad(flat, c) for c in chunks)
    hg = sum(hess(flat, c) @ g for c in chunks)
    return flat, g, hg, unravel


def prunable_vector(tree):
    flags = gj.prunable.prunable_flags(tree)
    return ravel_pytree([x for x, f in zip(jax.tree_util.tree_leaves(tree), flags) if f])[0]


def explicit_over_chunks(params, loss_fn, chunks):
    """θ, Σ_c ∇L_c and Σ_c H_c g over an explicit list of chunks, H from jax.hessian."""
    flags = gj.prunable.prunable_flags(params)
    theta, rest, treedef = gj.prunable.split_prunable(params, flags)
    flat, unravel = ravel_pytree(theta)

    def loss_flat(v, chunk):
        return loss_fn(gj.prunable.merge_prunable(unravel(v), rest, flags, treedef), chunk)

    grad, hess = jax.jit(jax.grad(loss_flat)), jax.jit(jax.hessian(loss_flat))
    g = sum(grad(flat, c) for c in chunks)
    hg = sum(hess(flat, c) @ g for c in chunks)
    return flat, g, hg


def cut(batch, sizes):
    starts = np.cumsum([0] + list(sizes))
    return [jax.tree_util.tree_map(lambda x, a=a, b=b: x[a:b], batch)
            for a, b in zip(starts, starts[1:])]


def counted_stream(batch, batch_size):
    """A factory of fresh iterators over consecutive slices of ``batch``, counting its calls."""
    calls = []

    def make_batches():
        calls.append(1)
        return iter(cut(batch, [batch_size] * (len(batch["y"]) // batch_size)))

    return make_batches, calls
