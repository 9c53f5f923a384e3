"""What a cell's ``results.json`` says: done, diverged, or not finished.

The runner writes ``results.json`` when a run ends: ``"status": "done"`` with
the accuracies, or ``"status": "diverged"`` with ``"diverged_at_step"`` (and no
accuracy) when the loss went non-finite. Files from before statuses existed
have no ``status``; a complete one of those is a done run. A preempted run
writes none (or one marked ``preempted``): it is resumed, not reported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from experiments import paths

RESULTS_JSON = "results.json"
DONE, DIVERGED = "done", "diverged"

# What a done run's results.json must hold for the sweep to use it.
DONE_KEYS = ("method", "seed", "sparsity_target", "steps", "final_test_accuracy")


def read_json(path: str) -> dict | None:
    """The JSON object in ``path``, or None when it is absent or unreadable."""
    try:
        data = json.loads(paths.read_text(path))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_status(results: Mapping[str, Any] | None) -> str | None:
    """``DONE``, ``DIVERGED``, or None for a run that has not finished (or unreadable results)."""
    if results is None or results.get("preempted", False):
        return None
    status = results.get("status", DONE)
    if status == DIVERGED:
        return DIVERGED
    if status == DONE and all(k in results for k in DONE_KEYS):
        return DONE
    return None


def is_complete(results: Mapping[str, Any] | None) -> bool:
    """Whether a results.json dict is a done run's, with every figure the report needs."""
    return run_status(results) == DONE


def is_diverged(results: Mapping[str, Any] | None) -> bool:
    return run_status(results) == DIVERGED


def diverged_at(results: Mapping[str, Any]) -> str:
    """The step a diverged run stopped at, as text ("?" when the runner did not say)."""
    step = results.get("diverged_at_step")
    return "?" if step is None else str(step)


def cell_state(cell_dir: str, num_steps: int) -> str | None:
    """``DONE`` (reached ``num_steps``; more is fine: a run cannot shrink), ``DIVERGED``
    (whatever its steps: a rerun would diverge again), or None: run it."""
    results = read_json(paths.join(cell_dir, RESULTS_JSON))
    status = run_status(results)
    if status == DONE and int(results["steps"]) < num_steps:
        return None
    return status


def cell_finished(cell_dir: str, num_steps: int) -> bool:
    """Whether the cell needs no run: done with ``num_steps`` steps, or diverged."""
    return cell_state(cell_dir, num_steps) is not None
