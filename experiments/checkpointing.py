"""Orbax checkpoints of a run.

Layout under ``<workdir>/checkpoints/<step>/``:

* ``state``: the training state as a pytree of arrays: ``step``, ``params``,
  ``batch_stats``, ``opt_state`` (the optax chain's NamedTuples, including
  :class:`grasp_jax.MaskedUpdatesState`), ``masks`` (booleans) and ``rng``
  (the run's base key; per-step keys are ``fold_in(rng, step)``). The step is
  also the data position: the input pipeline restarts exactly at batch
  ``step``.
* ``meta``: JSON with what the run has learned about itself: best test
  accuracy and its step, accumulated wall time and training time.

Orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` for (state, meta) pairs."""

    def __init__(self, workdir: str, max_to_keep: int = 3) -> None:
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                # Remove half-written steps left by a killed run.
                cleanup_tmp_directories=True,
                # Host arrays are written in a background thread while training goes on.
                enable_async_checkpointing=True,
            ),
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: PyTree, meta: dict) -> None:
        """Save; ``state`` should be host (numpy) arrays so that training may go on."""
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict]:
        """Restore into the structure, shapes and dtypes of ``abstract_state``."""
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return out["state"], dict(out["meta"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_state(workdir: str, step: Optional[int] = None) -> tuple[int, dict]:
    """(step, state as nested dicts of numpy arrays) of a run's checkpoint.

    For analysis and tests: no target structure is needed, so NamedTuples in the
    optimizer state come back as plain containers.
    """
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    )
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}")
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return step, jax.tree_util.tree_map(np.asarray, out["state"])

