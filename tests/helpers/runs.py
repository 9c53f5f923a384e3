"""Running the experiment runner from tests: in this process, or in a fresh one where needed.

A run in this process (:func:`run_in_process`) costs no interpreter start-up and shares
the process's compiled programs with every other test, and it can be sent a stop signal
mid-run (the run handles it and returns); a fresh process (:func:`run_cli`) is for what
one process cannot show: a kill, a device count (fixed when JAX starts), or what a process
prints as it exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import run, run_config
from experiments import workdir as workdirs
from tests.helpers.paths import REPO

DIGITS = ["--dataset", "digits", "--arch", "lenet5", "--batch_size", "32"]

# Runs the CLI after patching the train step so that the process sends itself
# `sig` right after finishing step `at` (a SIGKILL mid-epoch, or a SIGTERM),
# once a checkpoint is saved (checkpoints are written in the background). The
# workdir is read through the path layer, so it may be local or a bucket URL: a
# step is saved once orbax has renamed it to its bare number (local) or written
# its commit_success.txt (gs://), or once its upload's marker is there (s3://).
_SELF_SIGNAL = """
import os, sys, time
import jax
import experiments.steps as t
from experiments import checkpoint_staging, paths
at, sig = int(sys.argv[1]), int(sys.argv[2])
ckpts = paths.join(sys.argv[sys.argv.index("--workdir") + 1], "checkpoints")
def saved():
    if checkpoint_staging.is_staged(ckpts):
        return bool(checkpoint_staging.committed_steps(ckpts))
    names = paths.listdir(ckpts) if paths.isdir(ckpts) else []
    if not paths.is_url(ckpts):
        return any(n.isdigit() for n in names)
    return any(n.isdigit() and paths.exists(paths.join(ckpts, n, "commit_success.txt"))
               for n in names)
make = t.make_train_step
def make_train_step(model, tx, *args, **kwargs):
    step = make(model, tx, *args, **kwargs)
    def wrapped(state, batch):
        state, metrics = step(state, batch)
        if int(jax.device_get(state.step)[0]) == at:
            deadline = time.time() + 120
            while not saved() and time.time() < deadline:
                time.sleep(0.1)
            os.kill(os.getpid(), sig)
        return state, metrics
    return wrapped
t.make_train_step = make_train_step
from experiments.run import main
sys.exit(main(sys.argv[3:]))
"""


_MAIN = """
import sys
from experiments.run import main
sys.exit(main(sys.argv[1:]))
"""

# A torchvision-style bottleneck ResNet with one block per stage: ResNet-50's layout (7x7 stem,
# four strided stages of bottlenecks with projection shortcuts, fc) at a quarter of its depth,
# for runs that check the ImageNet protocol rather than ResNet-50 itself. Its name starts with
# "resnet", so it takes the ResNet presets.
TINY_RESNET = "resnet_bottleneck_tiny"
TINY_RESNET_STAGES = (1, 1, 1, 1)
REGISTER_TINY_RESNET = f"""
import functools
from grasp_jax import models
models.ARCHS[{TINY_RESNET!r}] = functools.partial(models.ResNetImageNet,
                                                 stage_sizes={TINY_RESNET_STAGES!r})
"""


def run_cli(args, *, devices=1, signal_at=None, prelude=None,
            timeout=600) -> subprocess.CompletedProcess:
    """``python -m experiments.run ARGS`` in a fresh process with ``devices`` CPU devices.

    ``signal_at=(step, signal)``: the process sends itself that signal after that step.
    ``prelude``: Python source run before the runner's ``main`` (e.g. REGISTER_TINY_RESNET).
    """
    assert signal_at is None or prelude is None, "one or the other"
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if signal_at is not None:
        at, sig = signal_at
        cmd = [sys.executable, "-c", _SELF_SIGNAL, str(at), str(int(sig)), *args]
    elif prelude is not None:
        cmd = [sys.executable, "-c", prelude + _MAIN, *args]
    else:
        cmd = [sys.executable, "-m", "experiments.run", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@dataclasses.dataclass
class Finished:
    """What a run in this process left: its exit status and console output."""

    returncode: int
    stdout: str
    stderr: str


def exit_code(e: SystemExit) -> int:
    """The status a process exiting with ``e`` would report, as ``sys.exit`` maps it."""
    if e.code is None:
        return 0
    return e.code if isinstance(e.code, int) else 1


def run_in_process(args, *, signal_at=None) -> Finished:
    """``experiments.run.main(ARGS)`` in this process, on its one CPU device.

    The exit status is main's return value, or that of the ``SystemExit`` it raised
    (a refusal); the console output is captured as a fresh process's would be.
    ``signal_at=(step, signal)``: this process sends itself that stop signal (SIGTERM,
    SIGINT or SIGHUP: one the run answers by saving, never one that would end the test's
    process) right after that train step, as ``run_cli``'s does.
    """
    import jax

    assert jax.local_device_count() == 1, "a run in this process expects one device"
    out, err = io.StringIO(), io.StringIO()
    signalled = _stop_signal_after(*signal_at) if signal_at else contextlib.nullcontext()
    with signalled, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run.main(list(args))
        except SystemExit as e:
            code = exit_code(e)
    return Finished(code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def stop_signal_handled_by_the_run(sig: int):
    """While open, ``sig`` sent to this process must reach the run's own handler
    (experiments.signals): one that arrives outside it (the run never reached the point that
    sends it, or stopped handling signals) fails the test here instead of ending the test
    process (SIGTERM) or the whole test session (SIGINT)."""
    from experiments import signals

    assert sig in signals.STOP_SIGNALS, f"{signal.Signals(sig).name} would end this process"

    def outside_the_run(signum, frame):
        raise AssertionError(f"{signal.Signals(signum).name} arrived outside the run's handler")

    previous = signal.signal(sig, outside_the_run)
    try:
        yield
    finally:
        signal.signal(sig, previous)


@contextlib.contextmanager
def _stop_signal_after(at: int, sig: int):
    """While open, the runner's train step sends this process ``sig`` after step ``at``."""
    import jax

    from experiments import steps

    make = steps.make_train_step

    def make_train_step(model, tx, *args, **kwargs):
        step = make(model, tx, *args, **kwargs)

        def wrapped(state, batch):
            state, metrics = step(state, batch)
            if int(jax.device_get(state.step)[0]) == at:
                os.kill(os.getpid(), sig)
            return state, metrics
        return wrapped

    steps.make_train_step = make_train_step
    try:
        with stop_signal_handled_by_the_run(sig):
            yield
    finally:
        steps.make_train_step = make


def read_metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl")]


def assert_refused(capsys, argv, *needles) -> str:
    """``main(argv)`` exits 2 with every needle in its error output; that output."""
    with pytest.raises(SystemExit) as e:
        run.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def saved_run(workdir, **overrides):
    """A workdir as a run of DIGITS (with overrides) leaves it, minus the training."""
    parser = run_config.build_parser()
    config = run_config.config_from_args(parser, parser.parse_args(DIGITS + [
        x for k, v in overrides.items() for x in (f"--{k}", str(v))]))
    workdirs.prepare(str(workdir), config, overwrite=False)
    return config
