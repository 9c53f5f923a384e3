"""Prune an NNX model at initialization, then train it: scikit-learn's digits, on CPU.

The model is written as the Flax NNX guides write one (nnx.Conv, nnx.BatchNorm,
nnx.Dropout, nnx.Linear). Pruning it takes three lines::

    scores = gj.nnx.grasp_scores(model, loss_fn, batch)   # loss_fn(model, batch)
    masks = gj.masks_from_scores(scores, 0.9, direction="highest")
    gj.nnx.apply_masks(model, masks)

and ``gj.masked_updates(masks)`` last in the optax chain of
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` keeps the pruned weights at 0.

    python examples/nnx_cnn.py --method grasp --sparsity 0.9 --steps 300
"""

from __future__ import annotations

import functools

import digits
import jax
import numpy as np
import optax
from flax import nnx

import grasp_jax as gj


class CNN(nnx.Module):
    def __init__(self, *, width: int = 16, num_classes: int = 10, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, width, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(width, rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(2 * width, rngs=rngs)
        self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(2 * width * 2 * 2, 64, rngs=rngs)
        self.dropout = nnx.Dropout(rate=0.3, rngs=rngs)
        self.linear2 = nnx.Linear(64, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.conv1(x))))   # 8x8 -> 4x4
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))   # 4x4 -> 2x2
        x = x.reshape(x.shape[0], -1)
        x = self.dropout(nnx.relu(self.linear1(x)))
        return self.linear2(x)


def scoring_loss(model: CNN, batch: dict) -> jax.Array:
    # GraSP's reference code scores at temperature T = 200 (softer softmax).
    return gj.cross_entropy_with_temperature(model(batch["image"]), batch["label"], 200.0)


def training_loss(model: CNN, batch: dict) -> jax.Array:
    logits = model(batch["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def score(model: CNN, method: str, batch: dict):
    """Scores and the end of their ranking that is pruned."""
    if method == "grasp":
        return gj.nnx.grasp_scores(model, scoring_loss, batch), "highest"
    if method == "snip":
        return gj.nnx.snip_scores(model, scoring_loss, batch), "lowest"
    if method == "synflow":
        return gj.nnx.synflow_scores(model, batch["image"].shape[1:]), "lowest"
    raise ValueError(f"method must be grasp, snip or synflow, got {method!r}")


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, batch: dict) -> jax.Array:
    loss, grads = nnx.value_and_grad(training_loss)(model, batch)
    optimizer.update(model, grads)
    return loss


def main(argv=None) -> None:
    args = digits.parse_flags(__doc__.splitlines()[0], argv, steps=300)

    train, test = digits.train_test(seed=args.seed)
    model = CNN(rngs=nnx.Rngs(args.seed))

    scores, direction = score(model, args.method, digits.class_balanced(train, per_class=10))
    masks = gj.masks_from_scores(scores, args.sparsity, direction=direction)
    gj.nnx.apply_masks(model, masks)
    print(f"{args.method} at {args.sparsity:.0%} sparsity:")
    print(gj.sparsity_report(masks))

    tx = optax.chain(optax.sgd(0.05, momentum=0.9), gj.masked_updates(masks))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    model.train()  # BatchNorm on batch statistics, Dropout on
    stream = digits.batches(train, args.batch_size, seed=args.seed)
    for step in range(1, args.steps + 1):
        loss = train_step(model, optimizer, next(stream))
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            print(f"step {step:4d}  loss {float(loss):.4f}")

    model.eval()
    print(f"test accuracy {digits.accuracy(np.asarray(model(test['image'])), test['label']):.3f}")
    pruned = [np.asarray(k[...])[~np.asarray(m[...])]
              for k, m in zip(jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)),
                              jax.tree_util.tree_leaves(masks))]
    print(f"pruned weights still exactly 0: {all(np.all(p == 0.0) for p in pruned)}")


if __name__ == "__main__":
    main()
