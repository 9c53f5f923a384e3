"""Orbax checkpoints of a run, and restoring the newest one that is intact.

Layout under ``<workdir>/checkpoints/<step>/``:

* ``state``: the training state as a pytree of arrays: ``step``, ``params``,
  ``batch_stats``, ``opt_state`` (the optax chain's NamedTuples, including
  :class:`grasp_jax.optim.MaskedUpdatesState`), ``masks`` (booleans) and ``rng``
  (the run's base key; per-step keys are ``fold_in(rng, step)``). The step is
  also the data position: the input pipeline restarts exactly at batch
  ``step``.
* ``meta``: JSON with what the run has learned about itself: best test
  accuracy and its step, and the run clock (``experiments.clock``).

Orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact. A checkpoint
damaged afterwards (a truncated or corrupted file, missing metadata) is moved
aside to ``<workdir>/checkpoints.damaged/`` by :meth:`Checkpointer.restore_newest`,
which then tries the next older one.

The workdir may be a ``gs://`` URL: orbax writes there natively (tensorstore's
GCS driver; a step is complete once its ``commit_success.txt`` exists, since
an object store has no atomic rename), and moving a damaged step aside is a
copy and delete of its objects (``experiments.paths.move``). Orbax 0.12.8
has no ``s3://`` checkpoint path (its array writer takes a local path or
``gs://``), so an ``s3://`` workdir is refused by the runner.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments import paths

PyTree = Any
DAMAGED_DIR = "checkpoints.damaged"


class NoUsableCheckpoint(RuntimeError):
    """Checkpoints exist but none of them restores."""


def _manager(directory: str, **options: Any) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(**options))


def save_policy(intervals: Sequence[int] = (), steps: Sequence[int] = ()
                ) -> ocp.checkpoint_managers.SaveDecisionPolicy:
    """Orbax's decision of when to save: at every multiple of each interval (0 or None:
    never) and at the given steps.

    Spelled out rather than ``save_interval_steps``, whose default policy also saves
    the first step of a fresh run (``InitialSavePolicy``) and at JAX's preemption sync
    point. That point is not used: it answers only when JAX's distributed runtime's
    preemption service is on, its own SIGTERM notifier would stand beside this
    project's handling of SIGTERM, SIGINT and SIGHUP (experiments.signals), and the
    processes of a run already agree on stopping at logging steps (train.Cadence).
    """
    cm = ocp.checkpoint_managers
    policies = [cm.FixedIntervalPolicy(int(n)) for n in intervals if n]
    if steps:
        policies.append(cm.SpecificStepsPolicy(frozenset(int(s) for s in steps)))
    return cm.AnySavePolicy(policies)


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` for (state, meta) pairs.

    ``max_to_keep``: the newest checkpoints kept (orbax's ``LatestN`` preservation
    policy; its ``max_to_keep`` option is deprecated). ``policy``: when
    :meth:`should_save` says yes (:func:`save_policy`; by default never, so every save
    is asked for explicitly).
    """

    def __init__(self, workdir: str, max_to_keep: int = 3,
                 policy: Optional[ocp.checkpoint_managers.SaveDecisionPolicy] = None) -> None:
        self.workdir = paths.absolute(workdir)
        self.directory = paths.join(self.workdir, "checkpoints")
        self.manager = _manager(
            self.directory, create=True,
            preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
            save_decision_policy=policy or save_policy(),
            # The decision depends on the step alone: a save still being written in the
            # background must not make orbax skip the next one.
            enable_should_save_is_saving_in_progress_check=False,
            # Remove half-written steps left by a killed run.
            cleanup_tmp_directories=True,
            # Host arrays are written in a background thread while training goes on.
            enable_async_checkpointing=True)

    def should_save(self, step: int) -> bool:
        """Whether the policy saves after ``step`` (never a step already saved)."""
        return self.manager.should_save(step)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: PyTree, meta: dict) -> None:
        """Save, whatever the policy says (the caller asked: a stop signal, or
        :meth:`should_save`); ``state`` should be host (numpy) arrays so that training
        may go on."""
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict]:
        """Restore into the structure, shapes and dtypes of ``abstract_state``."""
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                    meta=ocp.args.JsonRestore()),
        )
        meta = out["meta"]
        if not isinstance(meta, dict):
            raise ValueError(f"its meta item is {type(meta).__name__}, not a JSON object")
        return out["state"], dict(meta)

    def restore_newest(self, abstract_state: PyTree, log: Callable[[str], None] = print,
                       is_main: bool = True) -> Optional[tuple[int, PyTree, dict]]:
        """(step, state, meta) of the newest checkpoint that restores; None if there is none.

        Each one that fails is named in one line and moved aside (process 0
        moves, every process skips it); NoUsableCheckpoint when all fail.
        """
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                with _quiet_tensorstore():
                    state, meta = self.restore(step, abstract_state)
                return step, state, meta
            except Exception as e:  # noqa: BLE001 - any damage means: try the next one
                reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
                failures.append(f"  step {step}: {reason}")
                where = self._move_aside(step) if is_main else "left for process 0 to move"
                log(f"checkpoint {step} cannot be restored ({reason}); {where}; trying the "
                    "next older one")
        if failures:
            raise NoUsableCheckpoint(
                f"no checkpoint in {self.directory} restores:\n" + "\n".join(failures)
                + f"\nthe damaged ones are in {paths.join(self.workdir, DAMAGED_DIR)}; "
                "rerun with --overwrite to start over")
        return None

    def _move_aside(self, step: int) -> str:
        src = paths.join(self.directory, str(step))
        dst_dir = paths.join(self.workdir, DAMAGED_DIR)
        paths.makedirs(dst_dir)
        dst = paths.join(dst_dir, str(step))
        n = 1
        while paths.exists(dst):
            dst, n = paths.join(dst_dir, f"{step}.{n}"), n + 1
        paths.move(src, dst)
        self.manager.reload()
        return f"moved aside to {dst}"

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class _quiet_tensorstore:
    """Keep absl/tensorstore's per-chunk error logging of a damaged file out of the console."""

    def __enter__(self) -> None:
        self._level = logging.getLogger("absl").level
        logging.getLogger("absl").setLevel(logging.CRITICAL)

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("absl").setLevel(self._level)


def load_state(workdir: str, step: Optional[int] = None) -> tuple[int, dict]:
    """(step, state as nested dicts of numpy arrays) of a run's checkpoint.

    For analysis and tests: no target structure is needed, so NamedTuples in the
    optimizer state come back as plain containers.
    """
    manager = _manager(paths.absolute(paths.join(workdir, "checkpoints")), read_only=True,
                       create=False)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}")
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return step, jax.tree_util.tree_map(np.asarray, out["state"])
