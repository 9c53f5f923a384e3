"""Gradient flow at initialization after pruning, per method and sparsity.

``python -m benchmarks.gradient_flow --arch vgg19 --data_dir ../shared/tfds``

For the paper's networks on CIFAR-10: each one-shot method scores once
(GraSP and SNIP on the preset's class-balanced batch, as ``experiments.run``
does, GraSP on a copy with Xavier-redrawn dense layers),
then for each sparsity the masks are built and ``grasp_jax.gradient_flow``
measures the loss, ‖g‖² and gᵀHg over the kept weights on a different
training batch (BatchNorm in training mode). Prints a Markdown table; the
paper's claim is that at extreme sparsity GraSP keeps more gradient flow than
SNIP and random pruning.
"""

from __future__ import annotations

import argparse
import time

import jax

import grasp_jax as gj
from grasp_jax import data, models

from experiments import configs, data_scoring, jax_cache, steps


def _scores(config, info, model, variables, key):
    """The scores ``experiments.methods.compute_masks`` ranks for a one-shot method."""
    params = variables["params"]
    if config.method in ("grasp", "snip"):
        batch = data_scoring.scoring_batch(config, info)
        loss_fn = data_scoring.make_loss_fn(
            model, variables["batch_stats"], config.temperature, key
        )
        if config.score_reinit_dense:
            params_for_scoring = data_scoring.reinit_dense_kernels(
                params, jax.random.fold_in(key, 1)
            )
        else:
            params_for_scoring = params
        scorer = gj.grasp_scores if config.method == "grasp" else gj.snip_scores
        return scorer(
            params_for_scoring, loss_fn, batch, num_microbatches=config.num_score_microbatches
        )
    if config.method == "magnitude":
        return gj.magnitude_scores(params)
    if config.method == "random":
        return gj.random_scores(params, key)
    raise ValueError(
        f"{config.method!r}: only one-shot grasp, snip, magnitude and random are supported here"
    )


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="vgg19")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--methods", default="grasp,snip,random,magnitude")
    parser.add_argument("--sparsities", default="0.9,0.95,0.98")
    parser.add_argument("--batch_size", type=int, default=128, help="the diagnostics batch")
    parser.add_argument("--seed", type=int, default=0)
    jax_cache.add_flag(parser)
    args = parser.parse_args(argv)
    jax_cache.enable(args.compilation_cache)

    info = data.get_info(args.dataset)
    model = models.get_model(args.arch, info.num_classes)
    init_key, score_key, _ = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    variables = steps.init_variables(model, init_key, info.image_shape)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    rows = []
    print(
        f"{args.arch} on {args.dataset}, seed {args.seed}, diagnostics batch {args.batch_size}, "
        f"{jax.default_backend()}",
        flush=True,
    )
    for method in args.methods.split(","):
        t = time.time()
        config = configs.resolve(
            dataset=args.dataset,
            arch=args.arch,
            method=method,
            steps_per_epoch=1,
            seed=args.seed,
            data_dir=args.data_dir,
            batch_size=args.batch_size,
        )
        # One-shot criteria score once; the masks at every sparsity come from
        # the same scores (what experiments.run would compute at each one).
        scores = _scores(config, info, model, variables, score_key)
        for sparsity in sparsities:
            masks = gj.masks_from_scores(scores, sparsity,
                                         direction=gj.criteria.PRUNE_DIRECTION[method])
            flow = data_scoring.gradient_flow_report(
                config,
                info,
                model,
                variables,
                variables,
                masks,
                jax.random.fold_in(score_key, 3),
                log=lambda _: None,
            )
            rows.append({"method": method, "sparsity": sparsity, **flow})
            print(
                f"  {method:9s} {sparsity:.0%}: ||g||^2 {flow['after']['grad_norm_sq']:.3e} "
                f"(dense {flow['before']['grad_norm_sq']:.3e}), gHg {flow['after']['gHg']:.3e}, "
                f"loss {flow['after']['loss']:.4f}  [{time.time() - t:.0f}s]",
                flush=True,
            )
    print()
    print("| method | " + " | ".join(f"‖g‖² at {s:.0%}" for s in sparsities) + " |")
    print("|---|" + "---:|" * len(sparsities))
    for method in args.methods.split(","):
        cells = [r["after"]["grad_norm_sq"] for r in rows if r["method"] == method]
        print(f"| {method} | " + " | ".join(f"{c:.3e}" for c in cells) + " |")
    if rows:
        print(f"| dense | {rows[0]['before']['grad_norm_sq']:.3e} (at any sparsity) |")
    return rows


if __name__ == "__main__":
    main()
