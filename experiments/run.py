"""``python -m experiments.run``: prune at initialization, train, report.

    python -m experiments.run                       # the offline demo (digits, ~2 min on CPU)
    python -m experiments.run --dataset cifar10 --arch vgg19 --method grasp --sparsity 0.98
    python -m experiments.run --arch resnet50 --dataset imagenet2012 --data_dir ~/tfds

Flags not given take the paper's preset for the dataset and architecture (see
``experiments/configs.py``). Every value is checked before anything is
written: a bad one ends the program with a message and exit status 2.
Rerunning a command resumes its run from the latest checkpoint in
``--workdir``; a workdir that holds a run with a different configuration is
refused unless ``--overwrite`` is given.

Exit status: 0 finished; 1 error during the run (e.g. a pruned weight moved
off zero); 2 bad command line or conflicting workdir; 143 stopped by SIGTERM
after saving a checkpoint (rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Optional, Sequence

from experiments import configs

# The files a run owns in its workdir; --overwrite removes these and nothing else.
RUN_FILES = ("checkpoints", "tensorboard", "config.json", "metrics.jsonl", "results.json",
             "sparsity.md", "density.png", "masks.npz", "gradient_flow.json")

DEMO_WORKDIR = os.path.join("runs", "demo")
DEMO_RUNS = (("grasp_90", dict(method="grasp", sparsity=0.9)), ("dense", dict(method="dense")))


# --------------------------------------------------------------------------
# Argument types: each rejects a bad value at parse time, naming it.


def _number(kind, check, what):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: v > 0 and v < float("inf"), "a positive number")
nonnegative_float = _number(float, lambda v: 0 <= v < float("inf"), "a non-negative number")
fraction = _number(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (preset-filled flags say so in their help)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from grasp_jax import input_pipeline, models  # registries: the one list of valid names

    p = argparse.ArgumentParser(
        prog="python -m experiments.run",
        description="Prune a network at initialization (GraSP, SNIP, SynFlow, magnitude, random "
                    "or none), train it data-parallel over all devices, checkpoint, resume, and "
                    "report. Without arguments: an offline demo (GraSP 90% vs dense on digits).",
        epilog="Unset flags take the paper's preset for the dataset/arch (experiments/configs.py). "
               "Exit status: 0 done, 1 run error, 2 bad flags or conflicting workdir, "
               "143 stopped by SIGTERM after saving (rerun to resume).",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--dataset", default="cifar10", choices=input_pipeline.dataset_names(),
                   help="dataset (from the input pipeline's registry)")
    g.add_argument("--arch", choices=tuple(models.ARCHS), default=None, metavar="ARCH",
                   help="network, one of: " + ", ".join(models.ARCHS) + ". Default per dataset: "
                        + ", ".join(f"{d} {a}" for d, a in configs.DEFAULT_ARCH.items()))
    g.add_argument("--method", default="grasp", choices=configs.METHODS,
                   help="pruning criterion; 'dense' trains the unpruned network")
    g.add_argument("--sparsity", type=fraction, default=None,
                   help="fraction of conv/dense weights to prune, in [0, 1) (default 0.9; "
                        "0 for dense)")
    g.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seeds init, scoring data, data order, augmentation and dropout")

    g = p.add_argument_group("optimization (defaults: the paper's preset)")
    g.add_argument("--epochs", type=positive_int, default=None,
                   help="length of the schedule (preset: 160 CIFAR, 300 Tiny-ImageNet, 90 ImageNet)")
    g.add_argument("--max_steps", type=positive_int, default=None,
                   help="stop after this many steps (smoke runs); the lr schedule still spans "
                        "--epochs, so a later, larger value continues the same run")
    g.add_argument("--batch_size", type=positive_int, default=None,
                   help="global batch over all devices; must divide by the device count "
                        "(preset: 128, ImageNet 256)")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="initial learning rate (preset 0.1, scaled linearly by batch_size / preset "
                        "batch when --batch_size is changed)")
    g.add_argument("--momentum", type=fraction, default=None, help="SGD momentum (preset 0.9)")
    g.add_argument("--weight_decay", type=nonnegative_float, default=None,
                   help="L2 added to the gradient, PyTorch style (preset 5e-4 VGG, 1e-4 ResNet)")

    g = p.add_argument_group("pruning")
    g.add_argument("--scope", choices=("global", "layerwise"), default="global",
                   help="rank all layers together (the paper) or prune each layer by --sparsity")
    g.add_argument("--rounds", type=positive_int, default=None,
                   help="iterative pruning rounds (preset: 100 for synflow, 1 otherwise)")
    g.add_argument("--prune_schedule", choices=("exponential", "linear"), default="exponential",
                   help="sparsity schedule across --rounds")
    g.add_argument("--temperature", type=positive_float, default=None,
                   help="divide logits by this while scoring (preset: 200 for grasp, 1 otherwise)")
    g.add_argument("--score_reinit_dense", action=argparse.BooleanOptionalAction, default=None,
                   help="score a copy whose dense layers are re-drawn Xavier-normal, as the "
                        "reference GraSP does (preset: on for grasp, off otherwise)")
    g.add_argument("--score_samples_per_class", type=positive_int, default=None,
                   help="class-balanced scoring draw: images per class (preset: see configs.py)")
    g.add_argument("--score_draws", type=positive_int, default=None,
                   help="number of class-balanced draws, each scored in two halves")
    g.add_argument("--ablation", choices=configs.ABLATIONS, default="none",
                   help="sanity check (Frankle et al., 2021): shuffle = permute each layer's mask, "
                        "invert = keep what the method would prune (same count), reinit = train "
                        "the kept weights from a fresh initialization")
    g.add_argument("--gradient_flow", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the loss, ||g||^2 and g^T H g at init before and after pruning "
                        "on a training batch other than the scoring batch (results.json: "
                        "gradient_flow)")

    g = p.add_argument_group("running")
    g.add_argument("--workdir", default=None,
                   help="where checkpoints, logs and reports go (default: "
                        "runs/<dataset>_<arch>_<method>_<sparsity>_seed<seed>)")
    g.add_argument("--data_dir", default=None,
                   help="TFDS data dir (or the tiny-imagenet-200 folder); default: TFDS_DATA_DIR "
                        "or ~/tensorflow_datasets")
    g.add_argument("--overwrite", action="store_true",
                   help="discard the run already in --workdir (its checkpoints and reports) "
                        "and start over")
    g.add_argument("--checkpoint_every_steps", type=positive_int, default=None,
                   help="also checkpoint every N steps (always: every epoch, at the end, "
                        "on SIGTERM)")
    g.add_argument("--keep_checkpoints", type=positive_int, default=3,
                   help="how many recent checkpoints to keep")
    g.add_argument("--log_every_steps", type=positive_int, default=50,
                   help="training metrics are written every N steps")

    g = p.add_argument_group(
        "multi-host (docs/MULTIHOST.md)",
        "Start the same command on every process. Without these flags, JAX's distributed "
        "runtime is joined only when the environment is a multi-process cluster JAX detects "
        "(Cloud TPU pod, SLURM, Open MPI); otherwise the run is single-process.")
    g.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                   help="address of process 0, where the JAX coordinator listens")
    g.add_argument("--num_processes", type=positive_int, default=None,
                   help="number of processes in the run")
    g.add_argument("--process_id", type=nonnegative_int, default=None,
                   help="this process's index, in [0, --num_processes)")
    g.add_argument("--num_cpu_devices", type=positive_int, default=None,
                   help="CPU devices per process (tests and demos of multi-device runs on CPU)")
    g.add_argument("--distributed_timeout", type=positive_int, default=None,
                   help="seconds to wait for the coordinator at start-up (default 300); "
                        "a process whose peer stops responding exits after a fifth of this "
                        "(heartbeat timeout: at least 10 s, at most 100 s; 60 s by default)")
    return p


# --------------------------------------------------------------------------
# From flags to a checked config.


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> configs.Config:
    """Resolve the preset and check everything that needs the devices or the data.

    Any problem ends the program through ``parser.error`` (exit status 2)
    before anything is written.
    """
    from grasp_jax import input_pipeline

    arch = args.arch or configs.DEFAULT_ARCH[args.dataset]
    if args.method == "dense" and args.sparsity:
        parser.error(f"--method dense prunes nothing; got --sparsity {args.sparsity}")
    if args.method == "dense" and args.ablation != "none":
        parser.error(f"--method dense prunes nothing to ablate; got --ablation {args.ablation}")
    problem = arch_input_problem(arch, args.dataset)
    if problem:
        parser.error(f"--arch {arch} does not fit --dataset {args.dataset}: {problem}")
    preset = configs.preset(args.dataset, arch, args.method)
    batch_size = args.batch_size or preset["batch_size"]
    try:
        input_pipeline.device_batch_layout(batch_size)
    except ValueError as e:
        parser.error(f"--batch_size {batch_size}: {e}")
    try:
        steps_per_epoch = input_pipeline.steps_per_epoch(
            args.dataset, batch_size, data_dir=args.data_dir)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--dataset {args.dataset}: {e}")

    return configs.resolve(
        dataset=args.dataset, arch=arch, method=args.method, steps_per_epoch=steps_per_epoch,
        sparsity=args.sparsity, seed=args.seed, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, scope=args.scope, rounds=args.rounds,
        prune_schedule=args.prune_schedule, temperature=args.temperature,
        score_reinit_dense=args.score_reinit_dense,
        score_samples_per_class=args.score_samples_per_class, score_draws=args.score_draws,
        ablation=args.ablation, gradient_flow=args.gradient_flow,
        data_dir=args.data_dir, checkpoint_every_steps=args.checkpoint_every_steps,
        keep_checkpoints=args.keep_checkpoints, log_every_steps=args.log_every_steps,
    )


def arch_input_problem(arch: str, dataset: str) -> Optional[str]:
    """Why ``arch`` cannot take ``dataset``'s images, or None.

    Shapes only (``jax.eval_shape``): nothing is computed. A network can
    "accept" too small an input by pooling it down to an empty map (VGG19 on
    8x8 digits) and then average nothing into NaN, so empty intermediate
    outputs count as a failure too.
    """
    import jax
    import jax.numpy as jnp

    from grasp_jax import input_pipeline, models

    info = input_pipeline.get_info(dataset)
    model = models.get_model(arch, info.num_classes)
    x = jnp.zeros((1,) + info.image_shape, jnp.float32)
    try:
        logits, variables = jax.eval_shape(lambda: model.init_with_output(
            jax.random.PRNGKey(0), x, train=False, capture_intermediates=True))
    except Exception as e:  # noqa: BLE001 - any failure means the pair does not fit
        return f"{type(e).__name__}: {e}"
    empty = [jax.tree_util.keystr(path) for path, leaf in
             jax.tree_util.tree_leaves_with_path(variables.get("intermediates", {}))
             if 0 in leaf.shape]
    if empty:
        return (f"its {info.image_shape} images shrink to nothing inside the network "
                f"(first empty output at {empty[0]})")
    if logits.shape != (1, info.num_classes):
        return f"logits of shape {logits.shape}, expected (1, {info.num_classes})"
    return None


def default_workdir(config: configs.Config) -> str:
    name = f"{config.dataset}_{config.arch}_{config.method}"
    if config.method != "dense":
        name += f"_{config.sparsity:g}"
    return os.path.join("runs", f"{name}_seed{config.seed}")


def workdir_conflict(workdir: str, config: configs.Config) -> Optional[str]:
    """Why ``workdir`` cannot host ``config`` (None if it can: new, empty or the same run).

    Runs are the same when their resolved configs agree on every field except
    the run-control ones (``configs.RUN_CONTROL_FIELDS``: max_steps, data_dir,
    checkpoint/log frequency), which do not change the training trajectory.
    """
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = configs.Config.from_dict(json.load(f))
        except (OSError, ValueError, TypeError) as e:
            return f"{path} cannot be read ({e})"
        diff = configs.differences(saved, config)
        if diff:
            lines = "\n".join(f"  {k}: {a!r} in the workdir, {b!r} now" for k, a, b in diff)
            return f"{workdir} holds a run with a different configuration:\n{lines}"
        return None
    if os.path.exists(os.path.join(workdir, "checkpoints")):
        return f"{workdir} holds checkpoints but no config.json to check them against"
    return None


def prepare_workdir(workdir: str, config: configs.Config, overwrite: bool) -> None:
    """Create the workdir (process 0), clear the old run if asked, save the config."""
    import jax

    from experiments.outputs import write_text

    if jax.process_index() != 0:
        return
    if overwrite:
        for name in RUN_FILES:
            path = os.path.join(workdir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(workdir, exist_ok=True)
    write_text(os.path.join(workdir, "config.json"), config.to_json())


def sync_processes(name: str) -> None:
    """A barrier across the processes of a multi-host run (no-op on one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run(config: configs.Config, workdir: str, overwrite: bool = False) -> tuple[int, dict]:
    """Train one config in workdir; (exit status, results)."""
    from experiments import distributed, train
    from experiments.logging_utils import log

    prepare_workdir(workdir, config, overwrite)
    sync_processes("prepare_workdir")  # the others wait until process 0 has set the workdir up
    log(f"workdir {os.path.abspath(workdir)}")
    log("config " + json.dumps(config.to_dict(), sort_keys=True))
    try:
        results = train.train_and_evaluate(config, workdir)
    except (train.SparsityDriftError, distributed.MaskMismatchError) as e:
        import jax

        print(f"error (process {jax.process_index()}): {e}", file=sys.stderr)
        return 1, {}
    sync_processes("run_finished")  # leave together: process 0 writes the reports last
    return (train.PREEMPTED_EXIT_CODE if results["preempted"] else 0), results


def demo() -> int:
    """GraSP at 90% sparsity against dense, LeNet-5 on scikit-learn's digits: no download."""
    from experiments import report
    from experiments.logging_utils import log

    parser = build_parser()
    rows = []
    for name, flags in DEMO_RUNS:
        argv = ["--dataset", "digits", "--arch", "lenet5", "--method", flags["method"]]
        if "sparsity" in flags:
            argv += ["--sparsity", str(flags["sparsity"])]
        config = config_from_args(parser, parser.parse_args(argv))
        workdir = os.path.join(DEMO_WORKDIR, name)
        conflict = workdir_conflict(workdir, config)
        if conflict:
            parser.error(f"{conflict}\nremove {DEMO_WORKDIR} to rerun the demo")
        log(f"\n=== demo: {name} ===")
        status, results = run(config, workdir)
        if status:
            return status
        rows.append(results)
    log("\nLeNet-5 on digits (1,437 train / 360 test images):\n" + report.results_table(rows))
    return 0


def join_processes(parser: argparse.ArgumentParser, args: Optional[argparse.Namespace]) -> int:
    """Join the other processes of a multi-host run (before any JAX computation); 0 or 1."""
    from experiments import distributed

    launch = distributed.Launch()
    if args is not None:
        timeout = args.distributed_timeout or distributed.INIT_TIMEOUT_S
        heartbeat = min(max(timeout // 5, 10), 100)
        launch = distributed.Launch(
            coordinator_address=args.coordinator_address, num_processes=args.num_processes,
            process_id=args.process_id, num_cpu_devices=args.num_cpu_devices,
            # Shutdown waits for the slowest process to finish (process 0 writes the
            # reports); a dead one is caught by the heartbeat long before.
            init_timeout_s=timeout, heartbeat_timeout_s=heartbeat, shutdown_timeout_s=timeout)
        problem = distributed.check_launch(launch)
        if problem:
            parser.error(problem)
    try:
        if distributed.initialize(launch):
            print(distributed.describe(), file=sys.stderr, flush=True)
    except distributed.DistributedSetupError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        return join_processes(build_parser(), None) or demo()
    parser = build_parser()
    args = parser.parse_args(argv)
    status = join_processes(parser, args)
    if status:
        return status
    config = config_from_args(parser, args)
    workdir = args.workdir or default_workdir(config)
    conflict = workdir_conflict(workdir, config)
    if conflict and not args.overwrite:
        parser.error(f"{conflict}\npass --overwrite to discard it, or choose another --workdir")
    status, _ = run(config, workdir, overwrite=args.overwrite)
    return status


if __name__ == "__main__":
    sys.exit(main())
