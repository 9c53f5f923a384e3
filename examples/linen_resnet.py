"""Prune a foreign Linen ResNet at initialization, then train it: scikit-learn's digits, on CPU.

The ResNet is written the way Flax's ``examples/imagenet/models.py`` writes one
(shrunk for 8x8 images): its BatchNorm averages statistics over the pmap axis
``axis_name='batch'``, and the last BatchNorm of every residual block starts
with scale 0, so that each block starts as the identity.

Both matter to pruning at initialization:

* Outside ``pmap`` the axis ``'batch'`` is unbound. ``batch_axis_name='batch'``
  binds it while scoring (a size-1 ``vmap``: each chunk stays its own
  BatchNorm batch); this script does the same by hand for its train step.
* With those scales at 0 no gradient reaches the residual branches: every
  GraSP, SNIP and SynFlow score there is exactly 0, and which of those weights
  are pruned is decided by ties, not by the criterion. The script shows it,
  then scores a copy whose BatchNorm scales are 1 (the criterion then sees
  every layer) and applies those masks to the real initialization.

    python examples/linen_resnet.py --method grasp --sparsity 0.9 --steps 200
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import digits
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import grasp_jax as gj

ModuleDef = Any


class ResNetBlock(nn.Module):
    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)  # the block starts as identity
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    num_classes: int
    num_filters: int = 8
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                                 epsilon=1e-5, axis_name="batch")
        x = self.act(norm(name="bn_init")(conv(self.num_filters, (3, 3), name="conv_init")(x)))
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(self.num_filters * 2**i, conv=conv, norm=norm, act=self.act,
                                strides=strides)(x)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def with_batch_axis(fn: Callable) -> Callable:
    """``fn`` run under a size-1 ``vmap`` named ``'batch'``: what pmap would bind."""
    def bound(*args):
        out = jax.vmap(lambda _: fn(*args), axis_name="batch")(jnp.zeros(1))
        return jax.tree_util.tree_map(lambda x: x[0], out)
    return bound


def main(argv=None) -> None:
    args = digits.parse_flags(__doc__.splitlines()[0], argv, steps=200)

    train, test = digits.train_test(seed=args.seed)
    model = ResNet(stage_sizes=(2, 2), num_classes=10)
    variables = model.init(jax.random.PRNGKey(args.seed), train["image"][:2], train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]

    def scoring_loss(params, batch):
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                train=True, mutable=["batch_stats"])
        # GraSP's reference code scores at temperature T = 200 (softer softmax).
        return gj.cross_entropy_with_temperature(logits, batch["label"], 200.0)

    def apply_eval(params, x):
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

    score_batch = digits.class_balanced(train, per_class=10)

    def score(params):
        """Scores and the end of their ranking that is pruned."""
        if args.method == "synflow":  # BatchNorm on running averages: no axis is reduced over
            return gj.synflow_scores(params, apply_eval, score_batch["image"].shape[1:]), "lowest"
        fn = gj.grasp_scores if args.method == "grasp" else gj.snip_scores
        direction = "highest" if args.method == "grasp" else "lowest"
        return fn(params, scoring_loss, score_batch, batch_axis_name="batch"), direction

    scores, direction = score(params)
    flat = np.concatenate([np.ravel(s) for s, f in zip(jax.tree_util.tree_leaves(scores),
                                                       gj.prunable.prunable_flags(scores)) if f])
    print(f"{args.method} scores exactly 0 at initialization: {np.mean(flat == 0.0):.1%}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tied = gj.masks_from_scores(scores, args.sparsity, direction=direction)
    for w in caught:
        print(f"warning ({w.category.__name__}): {w.message}")
    print("masks from those scores (the zeros decided by position):")
    print(gj.sparsity_report(tied))

    # Score a copy with every BatchNorm scale at 1, prune the real initialization.
    unit_scales = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.ones_like(x) if gj.prunable.path_name(path).endswith("scale") else x,
        params)
    scores, direction = score(unit_scales)
    masks = gj.masks_from_scores(scores, args.sparsity, direction=direction)
    params = gj.apply_masks(params, masks)
    print(f"{args.method} at {args.sparsity:.0%} sparsity, scored with BatchNorm scales at 1:\n"
          f"{gj.sparsity_report(masks)}")

    tx = optax.chain(optax.sgd(0.05, momentum=0.9), gj.masked_updates(masks))
    opt_state = tx.init(params)

    def loss_and_stats(params, batch_stats, batch):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats},
                                      batch["image"], train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, updates["batch_stats"]

    @jax.jit
    @with_batch_axis
    def train_step(params, batch_stats, opt_state, batch):
        grad_fn = jax.value_and_grad(loss_and_stats, has_aux=True)
        (loss, batch_stats), grads = grad_fn(params, batch_stats, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    stream = digits.batches(train, args.batch_size, seed=args.seed)
    for step in range(1, args.steps + 1):
        params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state,
                                                          next(stream))
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            print(f"step {step:4d}  loss {float(loss):.4f}")

    logits = model.apply({"params": params, "batch_stats": batch_stats}, test["image"], train=False)
    print(f"test accuracy {digits.accuracy(np.asarray(logits), test['label']):.3f}")
    pruned = jax.tree_util.tree_map(lambda p, m: bool(jnp.all(p[~m] == 0.0)), params, masks)
    print(f"pruned weights still exactly 0: {all(jax.tree_util.tree_leaves(pruned))}")


if __name__ == "__main__":
    main()
