"""Prune a model that is only a dict of arrays, then train it: scikit-learn's digits, on CPU.

No framework: the parameters are ``{"dense0": {"kernel": ..., "bias": ...}, ...}``
and the model is a function of them. The core API takes any such pytree::

    scores = gj.grasp_scores(params, loss_fn, batch)      # loss_fn(params, batch)
    masks = gj.masks_from_scores(scores, 0.9, direction="highest")
    params = gj.apply_masks(params, masks)

Leaves named ``kernel`` with two or more axes are the prunable weights; name
yours otherwise and pass ``prunable=`` (a callable ``(path, leaf) -> bool``).

    python examples/dict_mlp.py --method grasp --sparsity 0.9 --steps 300
"""

from __future__ import annotations

import digits
import jax
import jax.numpy as jnp
import numpy as np
import optax

import grasp_jax as gj


def init_mlp(key: jax.Array, sizes=(64, 128, 128, 10)) -> dict:
    """He-normal kernels, zero biases, one ``dense{i}`` entry per layer."""
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"dense{i}"] = {
            "kernel": jax.random.normal(sub, (fan_in, fan_out)) * np.sqrt(2.0 / fan_in),
            "bias": jnp.zeros((fan_out,)),
        }
    return params


def mlp(params: dict, images: jax.Array) -> jax.Array:
    x = images.reshape(images.shape[0], -1)
    layers = [params[f"dense{i}"] for i in range(len(params))]
    for layer in layers[:-1]:
        x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
    return x @ layers[-1]["kernel"] + layers[-1]["bias"]


def scoring_loss(params: dict, batch: dict) -> jax.Array:
    # GraSP's reference code scores at temperature T = 200 (softer softmax).
    return gj.cross_entropy_with_temperature(mlp(params, batch["image"]), batch["label"], 200.0)


def training_loss(params: dict, batch: dict) -> jax.Array:
    logits = mlp(params, batch["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def score(params: dict, method: str, batch: dict):
    """Scores and the end of their ranking that is pruned."""
    if method == "grasp":
        return gj.grasp_scores(params, scoring_loss, batch), "highest"
    if method == "snip":
        return gj.snip_scores(params, scoring_loss, batch), "lowest"
    if method == "synflow":
        return gj.synflow_scores(params, mlp, batch["image"].shape[1:]), "lowest"
    raise ValueError(f"method must be grasp, snip or synflow, got {method!r}")


def main(argv=None) -> None:
    args = digits.parse_flags(__doc__.splitlines()[0], argv, steps=300)

    train, test = digits.train_test(seed=args.seed)
    params = init_mlp(jax.random.PRNGKey(args.seed))

    scores, direction = score(params, args.method, digits.class_balanced(train, per_class=10))
    masks = gj.masks_from_scores(scores, args.sparsity, direction=direction)
    params = gj.apply_masks(params, masks)
    print(f"{args.method} at {args.sparsity:.0%} sparsity:")
    print(gj.sparsity_report(masks))

    tx = optax.chain(optax.sgd(0.05, momentum=0.9), gj.masked_updates(masks))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(training_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    stream = digits.batches(train, args.batch_size, seed=args.seed)
    for step in range(1, args.steps + 1):
        params, opt_state, loss = train_step(params, opt_state, next(stream))
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            print(f"step {step:4d}  loss {float(loss):.4f}")

    logits = np.asarray(mlp(params, test["image"]))
    print(f"test accuracy {digits.accuracy(logits, test['label']):.3f}")
    pruned = jax.tree_util.tree_map(lambda p, m: bool(jnp.all(p[~m] == 0.0)), params, masks)
    print(f"pruned weights still exactly 0: {all(jax.tree_util.tree_leaves(pruned))}")


if __name__ == "__main__":
    main()
