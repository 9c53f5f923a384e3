"""``python -m experiments.run``: prune at initialization, train, report.

    python -m experiments.run                       # the offline demo (digits, ~1 min on CPU)
    python -m experiments.run --dataset cifar10 --arch vgg19 --method grasp --sparsity 0.98
    python -m experiments.run --arch resnet50 --dataset imagenet2012 --data_dir ~/tfds

The flags are generated from the run config's fields (``experiments/config_schema.py``);
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

import os
import sys
from typing import Optional, Sequence

from experiments import cli
from experiments import workdir as workdirs
from experiments.config_schema import UsageError
from experiments.run_config import (
    Invocation,
    _fields,
    build_parser,
    checked_config,
    checked_workdir,
    overrides_from_args,
)

DEMO_WORKDIR = os.path.join("runs", "demo")
DEMO_RUNS = (("grasp_90", dict(method="grasp", sparsity=0.9)), ("dense", dict(method="dense")))

# --------------------------------------------------------------------------
# Running: the parser and the checks are experiments.run_config's, one run in its
# workdir is experiments.session's.


def demo() -> int:
    """GraSP at 90% sparsity against dense, LeNet-5 on scikit-learn's digits: no download."""
    from experiments import report, session
    from experiments.logging_utils import log

    rows = []
    for name, flags in DEMO_RUNS:
        config, info = checked_config(dict(dataset="digits", arch="lenet5", **flags))
        path = os.path.join(DEMO_WORKDIR, name)
        conflict = workdirs.conflict(path, config)
        if conflict:
            build_parser().refuse(f"{conflict}\nremove {DEMO_WORKDIR} to rerun the demo")
        log(f"\n=== demo: {name} ===")
        status, results = session.run(config, path, info)
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
        config, info = checked_config(overrides_from_args(args))
        path = checked_workdir(invocation, config)
    except UsageError as e:
        parser.refuse(str(e))
    from experiments import session

    status, _ = session.run(config, path, info, overwrite=invocation.overwrite,
                            allow_layer_collapse=invocation.allow_layer_collapse,
                            allow_topology_change=invocation.allow_topology_change)
    return status


if __name__ == "__main__":
    sys.exit(main())
