"""The runner's command line as a library: its parser, and every check that turns flags
into a run's ``Config`` before anything is written.

``experiments.run`` (the CLI entry) and the sweep (which validates each cell's command
line before it writes anything) both parse through here; neither imports the other.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional, Sequence

from grasp_jax.data import DatasetInfo

from experiments import cli, config_schema, configs, methods, paths
from experiments import workdir as workdirs
from experiments.config_schema import UsageError, setting

RUNNING, MULTIHOST = config_schema.RUNNING, "multi-host (docs/MULTIHOST.md)"

# XLA:CPU sets its devices up in time that grows with the square of their number
# (1,000 took 0.4 s and 4,000 took 4 s on the development machine; 100,000 grew
# memory by ~70 MB/s for minutes without a word): more are refused before any is made.
MAX_CPU_DEVICES = 1024
cpu_device_count = config_schema.number_check(
    lambda v: float(v).is_integer() and 1 <= v <= MAX_CPU_DEVICES,
    f"a device count in [1, {MAX_CPU_DEVICES}] (XLA:CPU sets up devices in time that grows "
    "with the square of their number)")


@dataclasses.dataclass(frozen=True)
class Invocation:
    """How this command runs a config: not part of the run, never saved with it."""

    workdir: Optional[str] = setting(
        None, "where checkpoints, logs and reports go (default: "
        "runs/<dataset>_<arch>_<method>_<sparsity>_seed<seed>)", group=RUNNING,
        check=config_schema.nonempty_path)
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
        "~/.cache/grasp_jax/jax)", group=RUNNING, check=config_schema.nonempty_path)

    coordinator_address: Optional[str] = setting(
        None, "address of process 0, where the JAX coordinator listens. Without these flags, "
        "JAX's distributed runtime is joined only when the environment is a multi-process "
        "cluster JAX detects (Cloud TPU pod, SLURM, Open MPI)", group=MULTIHOST,
        metavar="HOST:PORT", check=config_schema.nonempty_path)
    join_cluster: bool = setting(
        False, "join through JAX's own cluster detection (jax.distributed.initialize() "
        "without arguments): needed on a Cloud TPU VM pod slice, whose layout comes from the "
        "metadata server; SLURM, Open MPI and TPU_WORKER_HOSTNAMES jobs of several processes "
        "are joined without it", group=MULTIHOST)
    num_processes: Optional[int] = setting(None, "number of processes in the run",
                                           group=MULTIHOST, check=config_schema.positive_int)
    process_id: Optional[int] = setting(None, "this process's index, in [0, --num_processes)",
                                        group=MULTIHOST, check=config_schema.nonnegative_int)
    num_cpu_devices: Optional[int] = setting(
        None, "CPU devices per process (tests and demos of multi-device runs on CPU)",
        group=MULTIHOST, check=cpu_device_count)
    distributed_timeout: Optional[int] = setting(
        None, "seconds to wait for the coordinator at start-up (default 300); a process whose "
        "peer stops responding exits after a fifth of this (at least 10 s, at most 100 s)",
        group=MULTIHOST, check=config_schema.positive_int)


def _fields(cls: type) -> tuple[dataclasses.Field, ...]:
    return tuple(f for f in dataclasses.fields(cls) if "help" in f.metadata)


def build_parser() -> cli.Parser:
    """The runner's parser; ``--method`` offers the method registry's names as they are now
    (a plugin imported before this call adds its own)."""
    method_names = methods.names()
    p = cli.Parser(
        prog="python -m experiments.run",
        description="Prune a network at initialization (" + ", ".join(method_names) + "), "
                    "train it data-parallel over all devices, checkpoint, resume, and report. "
                    "Without arguments: an offline demo (GraSP 90% vs dense on digits).",
        epilog="Unset flags take the paper's preset for the dataset/arch/method "
               "(experiments/presets.py). Exit status: 0 done, 1 run error (e.g. diverged), "
               "2 bad flags, conflicting or locked workdir, or collapsing masks, 128+signal "
               "when stopped by SIGTERM/SIGINT/SIGHUP after saving (rerun to resume).",
    )
    cli.add_fields(p, config_schema.flag_fields(), help_defaults={"dataset": "cifar10",
                                                            "method": "grasp"},
                   registered={"method": method_names})
    cli.add_fields(p, _fields(Invocation))
    return p


# --------------------------------------------------------------------------
# From flags to a checked config.


def overrides_from_args(args: Any) -> dict[str, Any]:
    """The config fields the command line gave."""
    return cli.given(args, config_schema.flag_fields())


def config_from_args(parser: cli.Parser, args: Any) -> config_schema.Config:
    """Resolve the preset and check everything, the data and devices included;
    UsageError (through ``parser.error``) for any problem, before anything is written."""
    try:
        return config_from_overrides(overrides_from_args(args))
    except UsageError as e:
        parser.error(str(e))


def config_from_overrides(overrides: dict[str, Any]) -> config_schema.Config:
    """The checked Config of these flag values (the sweep's cells are overrides too)."""
    return checked_config(overrides)[0]


def checked_config(overrides: dict[str, Any]) -> tuple[config_schema.Config, DatasetInfo]:
    """The checked Config of these flag values, and its dataset's info: made once here,
    for the checks, and handed down to the run (``session.run``) so that nothing after
    computes it again."""
    from grasp_jax import data

    overrides = dict(overrides)
    dataset = overrides.pop("dataset", "cifar10")
    method = overrides.pop("method", "grasp")
    arch = overrides.pop("arch", None) or config_schema.DEFAULT_ARCH[dataset]
    configs.check_method_settings(method, overrides)
    config = configs.resolve(dataset=dataset, arch=arch, method=method, steps_per_epoch=1,
                             **overrides)
    configs.validate(config)
    try:
        data.device_batch_layout(config.batch_size)
    except ValueError as e:
        raise UsageError(f"--batch_size {config.batch_size}: {e}") from None
    info = config_schema.dataset_info(config)  # once per run: every check below, then the run
    check_host_memory(config, info)
    check_environment(config, info)
    check_dataset_files(config, info)
    try:
        steps = data.steps_per_epoch(info, config.batch_size,
                                     data_dir=config.data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--dataset {dataset}: {e}") from None
    return dataclasses.replace(config, steps_per_epoch=steps), info


def parse_config(argv: Sequence[str]) -> config_schema.Config:
    """The checked Config of a runner command line; UsageError for any bad flag."""
    return config_from_overrides(overrides_from_args(build_parser().parse_args(list(argv))))


def host_memory_bytes() -> int:
    """This host's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_host_memory(config: config_schema.Config, info: Any = None) -> None:
    """UsageError naming the flag unless each batch this process holds, as float32
    images alone, fits in this host's memory. A lower bound of what a step needs,
    so nothing that could run is refused, and nothing is allocated to find out."""
    import jax

    info = config_schema.dataset_info(config) if info is None else info
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


def check_dataset_files(config: config_schema.Config, info: Any = None) -> None:
    """UsageError naming the file unless the dataset's info and split files are whole.

    Both splits' files are checked for presence and size; splits a run decodes into
    memory at start (CIFAR) have every record's CRC verified too, so a damaged test
    shard is named now rather than after pruning. A streamed split (ImageNet) is too
    large to read twice: a damaged record there stops the run when it is met.
    """
    from grasp_jax.data import integrity

    info = config_schema.dataset_info(config) if info is None else info
    try:
        integrity.check_dataset(info, config.data_dir, records=info.cache_decoded)
    except integrity.DatasetDamaged as e:
        raise UsageError(f"--dataset {config.dataset}: {e}") from None


def check_environment(config: config_schema.Config, info: Any = None) -> None:
    """UsageError unless the network takes the dataset's images and the sparsity
    leaves some weight. Shapes only: one ``jax.eval_shape`` of the network's init,
    read by both checks."""
    import jax

    import grasp_jax as gj

    info = config_schema.dataset_info(config) if info is None else info
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


def checked_workdir(invocation: Invocation, config: config_schema.Config) -> str:
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
