"""Cost of the masks in the train step, and train-step throughput, on CIFAR shapes.

    python -m benchmarks.train_step                       # ResNet-32 and VGG19, batch 32
    python -m benchmarks.train_step --archs resnet32 --batch_size 128 --pairs 20

For each network the real pmap'ed train step of ``experiments.train`` is run
with the optimizer the runner uses (weight decay + SGD with momentum +
``grasp_jax.masked_updates``) and with the same chain minus the masks. Single
steps alternate between the two, and each masked step is compared with the
plain step right after it, so a change in the machine's load hits both; the
median of these ratios is the overhead (target: under 3%). As a second,
load-independent figure, the masking alone (one select over every parameter)
is timed and divided by the plain step time. Images/s are those of the masked
step (median step time).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils

import grasp_jax as gj
from grasp_jax import models

from experiments import configs, jax_cache, steps


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def bench(arch: str, batch_size: int, pairs: int, sparsity: float, *,
          image_shape: tuple[int, int, int] = (32, 32, 3), num_classes: int = 10,
          dataset: str = "cifar10", model=None, variables=None) -> dict:
    """Masked vs plain train step of ``arch`` (or ``model``) on random ``image_shape`` batches.

    ``dataset`` only picks the preset's optimizer settings; ``variables`` (the model's, e.g.
    already initialized by the caller) spare an initialization.
    """
    model = models.get_model(arch, num_classes) if model is None else model
    n_dev = jax.local_device_count()
    config = configs.resolve(dataset=dataset, arch=arch, steps_per_epoch=391,
                             batch_size=batch_size)
    if variables is None:
        variables = steps.init_variables(model, jax.random.PRNGKey(0), image_shape)
    masks = gj.masks_from_scores(gj.random_scores(variables["params"], jax.random.PRNGKey(1)),
                                 sparsity, direction="lowest")
    plain_tx = optax.chain(  # the runner's chain without the masks
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(steps.learning_rate_schedule(config), momentum=config.momentum),
    )
    txs = {"masked": steps.make_optimizer(config, masks), "plain": plain_tx}
    rng = np.random.default_rng(0)
    per_dev = batch_size // n_dev
    batch = jax.device_put({
        "image": rng.normal(size=(n_dev, per_dev, *image_shape)).astype(np.float32),
        "label": rng.integers(0, num_classes, size=(n_dev, per_dev)).astype(np.int32),
    })

    step_fns, states, compile_s = {}, {}, {}
    for name, tx in txs.items():
        state = steps.create_state(variables, masks, tx, jax.random.PRNGKey(2))
        states[name] = jax_utils.replicate(state, axis_name=steps.AXIS)
        step_fns[name] = steps.make_train_step(model, tx)
        (states[name], _), compile_s[name] = _timed(step_fns[name], states[name], batch)
        (states[name], _), _ = _timed(step_fns[name], states[name], batch)  # one warm step

    times = {"masked": [], "plain": []}
    for _ in range(pairs):
        for name in ("masked", "plain"):
            (states[name], _), t = _timed(step_fns[name], states[name], batch)
            times[name].append(t)
    ratios = np.asarray(times["masked"]) / np.asarray(times["plain"])

    select = jax.jit(lambda u, m: jax.tree_util.tree_map(lambda a, b: jnp.where(b, a, 0), u, m))
    jax.block_until_ready(select(variables["params"], masks))
    select_s = min(_timed(select, variables["params"], masks)[1] for _ in range(20))

    median = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "arch": arch,
        "params": models.count_params(variables["params"]),
        "masked_step_s": median["masked"],
        "plain_step_s": median["plain"],
        "overhead": float(np.median(ratios)) - 1.0,
        "select_fraction": select_s / median["plain"],
        "images_per_s": batch_size / median["masked"],
        "compile_s": compile_s["masked"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["resnet32", "vgg19"], choices=tuple(models.ARCHS))
    p.add_argument("--batch_size", type=int, default=32, help="global batch of 32x32x3 images")
    p.add_argument("--pairs", type=int, default=8, help="timed (masked, plain) step pairs")
    p.add_argument("--sparsity", type=float, default=0.9)
    jax_cache.add_flag(p)
    args = p.parse_args()
    jax_cache.enable(args.compilation_cache)
    print(f"{jax.local_device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"batch {args.batch_size}, median of {args.pairs} alternating step pairs")
    print("| arch | params | step with masks | step without | overhead (paired) | "
          "mask select / step | images/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for arch in args.archs:
        r = bench(arch, args.batch_size, args.pairs, args.sparsity)
        print(f"| {arch} | {r['params']:,} | {r['masked_step_s'] * 1e3:.0f} ms | "
              f"{r['plain_step_s'] * 1e3:.0f} ms | {r['overhead']:+.1%} | "
              f"{r['select_fraction']:.2%} | {r['images_per_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
