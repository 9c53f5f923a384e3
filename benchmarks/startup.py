"""Where a short run's start-up goes, cold and warm (JAX's persistent compilation cache).

    python -m benchmarks.startup [--arch small_vgg] [--dataset cifar10] [--data_dir ../shared/tfds]

Runs one small sweep-cell-like run (GraSP 98%, one training step) twice in
fresh processes sharing a new, empty compilation cache: the first compiles
everything (cold), the second loads it (warm). Each child times the phases of
a run in order: imports, flag checks (the dataset's size is read), network
initialization, the scoring data, scoring, the gradient-flow diagnostics, the
first (compiling) train step, the evaluation of the test split, and the final
checkpoint. Prints one table with both columns.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PHASES = ("imports", "flag checks + dataset size", "init", "scoring data", "scoring",
          "gradient flow", "first train step", "evaluation", "checkpoint")


def _child(args: argparse.Namespace) -> dict[str, float]:
    """One run's phases, timed in this process (the cache directory is given)."""
    times: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[name] = now - t
        t = now

    import jax
    from flax import jax_utils

    import grasp_jax as gj
    from grasp_jax import data, models

    from experiments import (
        checkpointing,
        config_schema,
        data_scoring,
        devices,
        jax_cache,
        run_config,
        steps,
    )
    lap("imports")
    jax_cache.enable(args.cache)
    config = run_config.config_from_overrides(dict(
        dataset=args.dataset, arch=args.arch, method="grasp", sparsity=0.98, epochs=1,
        max_steps=1, data_dir=args.data_dir))
    lap("flag checks + dataset size")
    info = config_schema.dataset_info(config)
    model = models.get_model(config.arch, info.num_classes)
    init_key, score_key, step_key = jax.random.split(jax.random.PRNGKey(0), 3)
    variables = steps.init_variables(model, init_key, info.image_shape)
    jax.block_until_ready(variables)
    lap("init")
    batch = data_scoring.scoring_batch(config, info)
    lap("scoring data")
    # What the grasp entry of the method registry builds, without fetching the batch again.
    loss_fn = data_scoring.make_loss_fn(model, variables["batch_stats"], config.temperature,
                                        score_key, config.score_bn_mode)
    scoring_copy = data_scoring.reinit_dense_kernels(variables["params"],
                                                     jax.random.fold_in(score_key, 1))
    scores = gj.grasp_scores(scoring_copy, loss_fn, batch,
                             num_microbatches=config.num_score_microbatches)
    masks = jax.block_until_ready(gj.masks_from_scores(scores, config.sparsity,
                                                       criterion="grasp"))
    lap("scoring")
    data_scoring.gradient_flow_report(config, info, model, variables, variables, masks,
                                      jax.random.fold_in(score_key, 3), log=lambda _: None)
    lap("gradient flow")
    tx = steps.make_optimizer(config, masks)
    rstate = jax_utils.replicate(steps.create_state(variables, masks, tx, step_key),
                                 axis_name=steps.AXIS)
    pixel_stats = (info.mean, info.std)
    p_train = steps.make_train_step(model, tx, pixel_stats)
    p_eval = steps.make_eval_step(model, pixel_stats)
    batches = devices.prefetch_to_device(data.train_dataset(
        info, global_batch_size=config.batch_size, seed=0,
        data_dir=config.data_dir).as_numpy_iterator(), axis_name=steps.AXIS)
    rstate, metrics = p_train(rstate, next(batches))
    jax.block_until_ready(metrics)
    lap("first train step")
    steps.evaluate(p_eval, rstate, devices.prefetch_to_device(data.eval_dataset(
        info, global_batch_size=config.batch_size, data_dir=config.data_dir
    ).as_numpy_iterator(), axis_name=steps.AXIS))
    lap("evaluation")
    with tempfile.TemporaryDirectory() as workdir:
        ckpt = checkpointing.Checkpointer(workdir)
        from experiments import distributed

        ckpt.save(1, distributed.first_replica(rstate.as_dict()), {})
        ckpt.close()
    lap("checkpoint")
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="small_vgg")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data_dir", default=os.path.join("..", "shared", "tfds"))
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)  # the child's
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    with tempfile.TemporaryDirectory() as cache:
        runs = []
        for _ in ("cold", "warm"):
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.startup", "--child", "--cache", cache,
                 "--arch", args.arch, "--dataset", args.dataset, "--data_dir", args.data_dir],
                capture_output=True, text=True, check=True)
            phases = json.loads(out.stdout.strip().splitlines()[-1])
            phases["process, total"] = time.perf_counter() - start
            runs.append(phases)
    print(f"start-up of a {args.arch} / {args.dataset} GraSP run (1 step), seconds\n")
    print("| phase | cold | warm |\n|---|---:|---:|")
    for name in (*PHASES, "process, total"):
        print(f"| {name} | {runs[0][name]:.1f} | {runs[1][name]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
