"""The finished cells of a sweep directory, aggregated over seeds (mean ± sample std).

A diverged cell is counted and listed, never averaged: its row shows how many
seeds diverged and at which step, and its figures stay out of every mean.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from experiments import paths
from experiments.sweep.grid import NO_ABLATION
from experiments.sweep.results import DIVERGED, RESULTS_JSON, diverged_at, read_json, run_status

GROUP_KEY = ("dataset", "arch", "method", "sparsity", "ablation", "compute_dtype")
# What a run trained in when its results.json predates --compute_dtype.
DEFAULT_COMPUTE_DTYPE = "float32"

# The order of methods in tables and plots: the registry's (experiments.methods),
# restated because importing the registry loads JAX, which --report_only must not.
# tests/runner/sweep/test_report.py checks that it agrees; a method not listed here
# sorts after these, by name, and dense comes last.
METHOD_ORDER = ("grasp", "snip", "synflow", "magnitude", "random")


def _dig(d: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


# The figures aggregated over seeds: (column name, how to read it from a results.json dict).
METRICS: tuple[tuple[str, Callable[[Mapping[str, Any]], Any]], ...] = (
    ("final_test_accuracy", lambda r: r.get("final_test_accuracy")),
    ("best_test_accuracy", lambda r: r.get("best_test_accuracy")),
    ("grad_norm_sq_after", lambda r: _dig(r, "gradient_flow", "after", "grad_norm_sq")),
    ("gHg_after", lambda r: _dig(r, "gradient_flow", "after", "gHg")),
    ("grad_norm_sq_before", lambda r: _dig(r, "gradient_flow", "before", "grad_norm_sq")),
)


def method_rank(method: str) -> tuple:
    """Sort key of a method name: METHOD_ORDER, then others by name, dense last."""
    if method == "dense":
        return (2, "")
    if method in METHOD_ORDER:
        return (0, METHOD_ORDER.index(method))
    return (1, method)


# (results.json key, config.json key) for what a diverged run's results may lack.
_FROM_CONFIG = (("method", "method"), ("seed", "seed"), ("sparsity_target", "sparsity"),
                ("dataset", "dataset"), ("arch", "arch"))


def load_results(sweep_dir: str) -> tuple[list[dict], list[str]]:
    """(results.json dicts of the finished cell directories, names of unfinished cells).

    Finished: done or diverged (see experiments.sweep.results). Each dict
    gains ``cell`` (its directory name), ``status``, and ``ablation`` (from
    results.json, else the cell's config.json, else "none"); a diverged run's
    missing ``method``/``seed``/``sparsity_target``/``dataset``/``arch`` are
    taken from its config.json.
    """
    results, unfinished = [], []
    for name in sorted(paths.listdir(sweep_dir)):
        cell_dir = paths.join(sweep_dir, name)
        if not paths.isdir(cell_dir):
            continue
        r = read_json(paths.join(cell_dir, RESULTS_JSON))
        status = run_status(r)
        config = read_json(paths.join(cell_dir, "config.json")) or {}
        if status == DIVERGED:
            r = {**{k: config[c] for k, c in _FROM_CONFIG if c in config}, **r}
        if status is None or not all(k in r for k in ("method", "seed", "sparsity_target")):
            if paths.exists(paths.join(cell_dir, "config.json")):
                unfinished.append(name)
            continue
        r = dict(r, cell=name, status=status)
        r["ablation"] = r.get("ablation") or config.get("ablation") or NO_ABLATION
        r["compute_dtype"] = (r.get("compute_dtype") or config.get("compute_dtype")
                              or DEFAULT_COMPUTE_DTYPE)
        results.append(r)
    return results, unfinished


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of the finite numbers in ``values``.

    (None, None) without any; std None with one (a spread needs two seeds).
    """
    xs = [float(v) for v in values
          if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not xs:
        return None, None
    if len(xs) == 1:
        return xs[0], None
    return statistics.fmean(xs), statistics.stdev(xs)


def _sort_key(row: Mapping[str, Any]) -> tuple:
    return (row["dataset"], row["arch"], method_rank(row["method"]), row["method"],
            row["sparsity"], row["ablation"] != NO_ABLATION, row["ablation"],
            row["compute_dtype"] != DEFAULT_COMPUTE_DTYPE, row["compute_dtype"])


def _steps(members: Sequence[Mapping[str, Any]]) -> str:
    steps = sorted({int(r["steps"]) for r in members})
    if not steps:
        return ""
    return str(steps[0]) if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"


def aggregate(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, arch, method, sparsity, ablation, compute_dtype) over the seeds:
    runs trained in bfloat16 are never averaged with float32 ones.

    ``results`` are results.json dicts (``ablation`` defaults to "none",
    ``compute_dtype`` to "float32").
    A row has the group key, ``seeds`` (the done seeds, sorted), ``steps``
    ("N", or "lo-hi" when the seeds differ; "" when none is done),
    ``<metric>_mean`` / ``<metric>_std`` over the done seeds for each of
    METRICS (None where no seed has the figure), and ``diverged``: the
    diverged seeds as sorted (seed, step) pairs, in no mean.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in results:
        key = (str(r.get("dataset", "")), str(r.get("arch", "")), r["method"],
               float(r["sparsity_target"]), r.get("ablation") or NO_ABLATION,
               r.get("compute_dtype") or DEFAULT_COMPUTE_DTYPE)
        groups.setdefault(key, []).append(r)
    rows = []
    for key, members in groups.items():
        done = [r for r in members if run_status(r) != DIVERGED]
        row: dict[str, Any] = dict(zip(GROUP_KEY, key))
        row["seeds"] = sorted(int(r["seed"]) for r in done)
        row["steps"] = _steps(done)
        for name, read in METRICS:
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std(read(r) for r in done)
        row["diverged"] = sorted((int(r["seed"]), diverged_at(r)) for r in members
                                 if run_status(r) == DIVERGED)
        rows.append(row)
    return sorted(rows, key=_sort_key)
