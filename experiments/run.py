"""``python -m experiments.run``: prune at initialization, train, report.

    python -m experiments.run                       # the offline demo (digits, ~1 min on CPU)
    python -m experiments.run --dataset cifar10 --arch vgg19 --method grasp --sparsity 0.98
    python -m experiments.run --arch resnet50 --dataset imagenet2012 --data_dir ~/tfds

The flags are generated from the run config's fields (``experiments/configs.py``);
flags not given take the paper's preset for the dataset, architecture and
method. Every value is checked before anything is written: a bad one ends the
program with a message and exit status 2. Rerunning a command resumes its run
from the latest checkpoint in ``--workdir``; a workdir that holds a run with a
different configuration is refused unless ``--overwrite`` is given, and a
workdir another live run holds is refused always.

Exit status: 0 finished; 1 error during the run (diverged, a pruned weight
moved off zero, no checkpoint restores, a damaged record of a streamed dataset);
2 bad command line or environment variable, a size this host cannot hold, a
damaged dataset file, conflicting or locked workdir, or collapsing masks;
128 + signal when stopped by SIGTERM, SIGINT or SIGHUP after saving a checkpoint
(rerun to resume).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any, Optional, Sequence

from experiments import cli, configs, paths
from experiments import workdir as workdirs
from experiments.configs import UsageError, setting

DEMO_WORKDIR = os.path.join("runs", "demo")
DEMO_RUNS = (("grasp_90", dict(method="grasp", sparsity=0.9)), ("dense", dict(method="dense")))

RUNNING, MULTIHOST = configs.RUNNING, "multi-host (docs/MULTIHOST.md)"

# XLA:CPU sets its devices up in time that grows with the square of their number
# (1,000 took 0.4 s and 4,000 took 4 s on the development machine; 100,000 grew
# memory by ~70 MB/s for minutes without a word): more are refused before any is made.
MAX_CPU_DEVICES = 1024
cpu_device_count = configs._number(lambda v: float(v).is_integer() and 1 <= v <= MAX_CPU_DEVICES,
                                   f"a device count in [1, {MAX_CPU_DEVICES}] (XLA:CPU sets up "
                                   "devices in time that grows with the square of their number)")


@dataclasses.dataclass(frozen=True)
class Invocation:
    """How this command runs a config: not part of the run, never saved with it."""

    workdir: Optional[str] = setting(
        None, "where checkpoints, logs and reports go (default: "
        "runs/<dataset>_<arch>_<method>_<sparsity>_seed<seed>)", group=RUNNING,
        check=configs.nonempty_path)
    overwrite: bool = setting(False, "discard the run already in --workdir (its checkpoints and "
                              "reports) and start over", group=RUNNING)
    allow_layer_collapse: bool = setting(
        False, "train even when the masks empty a whole prunable layer (refused by default)",
        group=RUNNING)
    allow_topology_change: bool = setting(
        False, "resume a checkpoint saved on another number of devices or processes (refused "
        "by default: the result then differs from an uninterrupted run)", group=RUNNING)
    compilation_cache: Optional[str] = setting(
        None, "JAX's persistent compilation cache directory, so reruns, resumes and sweep cells "
        "skip compiling ('none' disables; default: $XDG_CACHE_HOME/grasp_jax/jax or "
        "~/.cache/grasp_jax/jax)", group=RUNNING, check=configs.nonempty_path)

    coordinator_address: Optional[str] = setting(
        None, "address of process 0, where the JAX coordinator listens. Without these flags, "
        "JAX's distributed runtime is joined only when the environment is a multi-process "
        "cluster JAX detects (Cloud TPU pod, SLURM, Open MPI)", group=MULTIHOST,
        metavar="HOST:PORT", check=configs.nonempty_path)
    join_cluster: bool = setting(
        False, "join through JAX's own cluster detection (jax.distributed.initialize() "
        "without arguments): needed on a Cloud TPU VM pod slice, whose layout comes from the "
        "metadata server; SLURM, Open MPI and TPU_WORKER_HOSTNAMES jobs of several processes "
        "are joined without it", group=MULTIHOST)
    num_processes: Optional[int] = setting(None, "number of processes in the run",
                                           group=MULTIHOST, check=configs.positive_int)
    process_id: Optional[int] = setting(None, "this process's index, in [0, --num_processes)",
                                        group=MULTIHOST, check=configs.nonnegative_int)
    num_cpu_devices: Optional[int] = setting(
        None, "CPU devices per process (tests and demos of multi-device runs on CPU)",
        group=MULTIHOST, check=cpu_device_count)
    distributed_timeout: Optional[int] = setting(
        None, "seconds to wait for the coordinator at start-up (default 300); a process whose "
        "peer stops responding exits after a fifth of this (at least 10 s, at most 100 s)",
        group=MULTIHOST, check=configs.positive_int)


def _fields(cls: type) -> tuple[dataclasses.Field, ...]:
    return tuple(f for f in dataclasses.fields(cls) if "help" in f.metadata)


def build_parser() -> cli.Parser:
    p = cli.Parser(
        prog="python -m experiments.run",
        description="Prune a network at initialization (" + ", ".join(_method_names()) + "), "
                    "train it data-parallel over all devices, checkpoint, resume, and report. "
                    "Without arguments: an offline demo (GraSP 90% vs dense on digits).",
        epilog="Unset flags take the paper's preset for the dataset/arch/method "
               "(experiments/configs.py). Exit status: 0 done, 1 run error (e.g. diverged), "
               "2 bad flags, conflicting or locked workdir, or collapsing masks, 128+signal "
               "when stopped by SIGTERM/SIGINT/SIGHUP after saving (rerun to resume).",
    )
    cli.add_fields(p, configs.flag_fields(), help_defaults={"dataset": "cifar10",
                                                            "method": "grasp"})
    cli.add_fields(p, _fields(Invocation))
    return p


def _method_names() -> list[str]:
    from experiments import methods

    return list(methods.names())


# --------------------------------------------------------------------------
# From flags to a checked config.


def overrides_from_args(args: Any) -> dict[str, Any]:
    """The config fields the command line gave."""
    return cli.given(args, configs.flag_fields())


def config_from_args(parser: cli.Parser, args: Any) -> configs.Config:
    """Resolve the preset and check everything, the data and devices included;
    UsageError (through ``parser.error``) for any problem, before anything is written."""
    try:
        return config_from_overrides(overrides_from_args(args))
    except UsageError as e:
        parser.error(str(e))


def config_from_overrides(overrides: dict[str, Any]) -> configs.Config:
    """The checked Config of these flag values (the sweep's cells are overrides too)."""
    from grasp_jax import data

    overrides = dict(overrides)
    dataset = overrides.pop("dataset", "cifar10")
    method = overrides.pop("method", "grasp")
    arch = overrides.pop("arch", None) or configs.DEFAULT_ARCH[dataset]
    configs.check_method_settings(method, overrides)
    config = configs.resolve(dataset=dataset, arch=arch, method=method, steps_per_epoch=1,
                             **overrides)
    configs.validate(config)
    try:
        data.device_batch_layout(config.batch_size)
    except ValueError as e:
        raise UsageError(f"--batch_size {config.batch_size}: {e}") from None
    check_host_memory(config)
    check_environment(config)
    check_dataset_files(config)
    try:
        steps = data.steps_per_epoch(configs.dataset_info(config), config.batch_size,
                                     data_dir=config.data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--dataset {dataset}: {e}") from None
    return dataclasses.replace(config, steps_per_epoch=steps)


def parse_config(argv: Sequence[str]) -> configs.Config:
    """The checked Config of a runner command line; UsageError for any bad flag."""
    return config_from_overrides(overrides_from_args(build_parser().parse_args(list(argv))))


def host_memory_bytes() -> int:
    """This host's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_host_memory(config: configs.Config) -> None:
    """UsageError naming the flag unless each batch this process holds, as float32
    images alone, fits in this host's memory. A lower bound of what a step needs,
    so nothing that could run is refused, and nothing is allocated to find out."""
    import jax

    info = configs.dataset_info(config)
    image_bytes = math.prod(info.image_shape) * 4
    processes = jax.process_count()
    batches = [("--batch_size", config.batch_size, -(-config.batch_size // processes))]
    if config.score_batches:
        batches.append(("--score_batch_size", config.score_batch_size, config.score_batch_size))
    else:
        draw = config.score_samples_per_class * info.num_classes
        batches.append(("--score_samples_per_class", config.score_samples_per_class, draw))
    limit = host_memory_bytes()
    size = f" at --image_size {config.image_size}" if config.image_size else ""
    for flag, value, images in batches:
        if images * image_bytes > limit:
            raise UsageError(
                f"{flag} {value}{size}: {images:,} float32 {'x'.join(map(str, info.image_shape))} "
                f"images in one batch of this process take {images * image_bytes / 2**30:,.1f} "
                f"GiB, more than this host's {limit / 2**30:,.1f} GiB of memory")


def check_dataset_files(config: configs.Config) -> None:
    """UsageError naming the file unless the dataset's info and split files are whole.

    Both splits' files are checked for presence and size; splits a run decodes into
    memory at start (CIFAR) have every record's CRC verified too, so a damaged test
    shard is named now rather than after pruning. A streamed split (ImageNet) is too
    large to read twice: a damaged record there stops the run when it is met.
    """
    from grasp_jax.data import integrity

    info = configs.dataset_info(config)
    try:
        integrity.check_dataset(info, config.data_dir, records=info.cache_decoded)
    except integrity.DatasetDamaged as e:
        raise UsageError(f"--dataset {config.dataset}: {e}") from None


def check_environment(config: configs.Config) -> None:
    """UsageError unless the network takes the dataset's images and the sparsity
    leaves some weight. Shapes only: one ``jax.eval_shape`` of the network's init,
    read by both checks."""
    import jax

    import grasp_jax as gj

    info = configs.dataset_info(config)
    outputs, problem = abstract_init(config.arch, info)
    problem = problem or input_problem(info, *outputs)
    if problem:
        raise UsageError(f"--arch {config.arch} does not fit --dataset {config.dataset}: "
                         f"{problem}")
    if config.sparsity:
        params = outputs[1]["params"]
        leaves = jax.tree_util.tree_leaves(params)
        flags = gj.prunable.prunable_flags(params)
        total = sum(math.prod(x.shape) for x, f in zip(leaves, flags) if f)
        removed = gj.masks.num_to_prune(config.sparsity, total)
        if removed >= total:
            raise UsageError(f"--sparsity {config.sparsity!r} removes all {total:,} prunable "
                             f"weights of {config.arch} (round(s·N) = {removed:,})")


def abstract_init(arch: str, info: Any) -> tuple[Any, Optional[str]]:
    """((logits, variables) as shapes, with intermediates captured), or (None, why it fails)."""
    import jax
    import jax.numpy as jnp

    from grasp_jax import models

    model = models.get_model(arch, info.num_classes)
    x = jnp.zeros((1,) + info.image_shape, jnp.float32)
    try:
        return jax.eval_shape(lambda: model.init_with_output(
            jax.random.PRNGKey(0), x, train=False, capture_intermediates=True)), None
    except Exception as e:  # noqa: BLE001 - any failure means the pair does not fit
        return None, f"{type(e).__name__}: {e}"


def input_problem(info: Any, logits: Any, variables: Any) -> Optional[str]:
    """Why the abstract outputs show that the network cannot take ``info``'s images, or None.

    A network can "accept" too small an input by pooling it down to an empty
    map (VGG19 on 8x8 digits) and then average nothing into NaN, so empty
    intermediate outputs count as a failure too.
    """
    import jax

    empty = [jax.tree_util.keystr(path) for path, leaf in
             jax.tree_util.tree_leaves_with_path(variables.get("intermediates", {}))
             if 0 in leaf.shape]
    if empty:
        return (f"its {info.image_shape} images shrink to nothing inside the network "
                f"(first empty output at {empty[0]})")
    if logits.shape != (1, info.num_classes):
        return f"logits of shape {logits.shape}, expected (1, {info.num_classes})"
    return None


def checked_workdir(invocation: Invocation, config: configs.Config) -> str:
    """The workdir, refused (UsageError) when unusable or holding another run."""
    path = invocation.workdir if invocation.workdir is not None else \
        workdirs.default_workdir(config)
    if not paths.is_url(path):
        # "x/../y" is y: creating it must not create a stray x on the way.
        path = os.path.normpath(path)
    problem = workdirs.unusable(path)
    if problem:
        raise UsageError(f"--workdir {path!r} {problem}")
    conflict = workdirs.conflict(path, config)
    if conflict and not invocation.overwrite:
        raise UsageError(f"{conflict}\npass --overwrite to discard it, or choose another "
                         "--workdir")
    return path


# --------------------------------------------------------------------------
# Running.


def run(config: configs.Config, workdir: str, overwrite: bool = False,
        allow_layer_collapse: bool = False,
        allow_topology_change: bool = False) -> tuple[int, dict]:
    """Train one config in ``workdir``, holding its lock; (exit status, results)."""
    from experiments import session

    return session.run(config, workdir, overwrite=overwrite,
                       allow_layer_collapse=allow_layer_collapse,
                       allow_topology_change=allow_topology_change)


def demo() -> int:
    """GraSP at 90% sparsity against dense, LeNet-5 on scikit-learn's digits: no download."""
    from experiments import report
    from experiments.logging_utils import log

    rows = []
    for name, flags in DEMO_RUNS:
        config = config_from_overrides(dict(dataset="digits", arch="lenet5", **flags))
        path = os.path.join(DEMO_WORKDIR, name)
        conflict = workdirs.conflict(path, config)
        if conflict:
            build_parser().refuse(f"{conflict}\nremove {DEMO_WORKDIR} to rerun the demo")
        log(f"\n=== demo: {name} ===")
        status, results = run(config, path)
        if status:
            return status
        rows.append(results)
    log("\nLeNet-5 on digits (1,437 train / 360 test images):\n" + report.results_table(rows))
    return 0


def join_processes(invocation: Invocation) -> int:
    """Join the other processes of a multi-host run (before any JAX computation); 0 or 1."""
    from experiments import distributed

    timeout = invocation.distributed_timeout or distributed.INIT_TIMEOUT_S
    launch = distributed.Launch(
        coordinator_address=invocation.coordinator_address,
        num_processes=invocation.num_processes, process_id=invocation.process_id,
        num_cpu_devices=invocation.num_cpu_devices, join_cluster=bool(invocation.join_cluster),
        # Shutdown waits for the slowest process to finish (process 0 writes the
        # reports); a dead one is caught by the heartbeat long before.
        init_timeout_s=timeout, heartbeat_timeout_s=min(max(timeout // 5, 10), 100),
        shutdown_timeout_s=timeout)
    problem = distributed.check_launch(launch)
    if problem:
        raise UsageError(problem)
    try:
        if distributed.initialize(launch):
            print(distributed.describe(), file=sys.stderr, flush=True)
    except distributed.DistributedSetupError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


PLUGINS_ENV = "GRASP_JAX_PLUGINS"


def import_plugins() -> None:
    """Import the modules named in $GRASP_JAX_PLUGINS (comma-separated), before the
    parser is built: a criterion they register is then a ``--method`` choice."""
    import importlib

    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UsageError(f"environment variable {PLUGINS_ENV}: cannot import module "
                             f"{name!r} ({type(e).__name__}: {e})") from None


def check_environment_variables() -> None:
    """UsageError naming the variable unless the environment's settings are valid."""
    from grasp_jax.models import conv

    try:
        conv.resolve_mode()
    except ValueError as e:
        raise UsageError(str(e)) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    from experiments import jax_cache

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import_plugins()
        check_environment_variables()
    except UsageError as e:
        cli.Parser(prog="python -m experiments.run").refuse(str(e))
    parser = build_parser()
    if not argv:
        jax_cache.enable(None)
        return join_processes(Invocation()) or demo()
    try:
        args = parser.parse_args(argv)
        invocation = Invocation(**cli.given(args, _fields(Invocation)))
        cache = invocation.compilation_cache
        if cache is not None and cache != jax_cache.DISABLED and jax_cache.unusable(cache):
            # Asked for by name, so refused rather than silently run without.
            raise UsageError(f"--compilation_cache {cache!r} {jax_cache.unusable(cache)} "
                             f"(pass --compilation_cache {jax_cache.DISABLED} to run without)")
        status = join_processes(invocation)
        if status:
            return status
        jax_cache.enable(invocation.compilation_cache)
        config = config_from_args(parser, args)
        path = checked_workdir(invocation, config)
    except UsageError as e:
        parser.refuse(str(e))
    status, _ = run(config, path, overwrite=invocation.overwrite,
                    allow_layer_collapse=invocation.allow_layer_collapse,
                    allow_topology_change=invocation.allow_topology_change)
    return status


if __name__ == "__main__":
    sys.exit(main())
