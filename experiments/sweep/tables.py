"""results.md and results.csv: the aggregated rows as tables."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from experiments import paths
from experiments.outputs import write_text
from experiments.sweep.aggregation import (
    DEFAULT_COMPUTE_DTYPE,
    GROUP_KEY,
    METRICS,
    aggregate,
    load_results,
)
from experiments.sweep.grid import NO_ABLATION

RESULTS_MD, RESULTS_CSV = "results.md", "results.csv"


def _pm(mean: float | None, std: float | None, fmt: Callable[[float], str]) -> str:
    if mean is None:
        return "–"
    return fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"


def _percent(x: float) -> str:
    return f"{100 * x:.2f}"


def _sci(x: float) -> str:
    return f"{x:.3g}"


MD_COLUMNS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("final test acc (%)", "final_test_accuracy", _percent),
    ("best test acc (%)", "best_test_accuracy", _percent),
    ("‖g‖² after pruning", "grad_norm_sq_after", _sci),
    ("gᵀHg after pruning", "gHg_after", _sci),
)


def _diverged_note(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per diverged cell: which, and at which step."""
    lines = []
    for r in rows:
        what = f"{r['method']} {r['arch']}/{r['dataset']}"
        if r["method"] != "dense":
            what += f" sparsity {r['sparsity']:.2%}"
        if r["ablation"] != NO_ABLATION:
            what += f" ablation {r['ablation']}"
        lines += [f"- {what} seed {seed}: diverged at step {step}" for seed, step in r["diverged"]]
    if not lines:
        return []
    return ["", ("Diverged (the loss became non-finite; counted in the last column, "
            "left out of every mean):"), *lines]


def to_markdown(rows: Sequence[Mapping[str, Any]], unfinished: Sequence[str] = (),
                plots: Sequence[tuple[str, str]] = ()) -> str:
    """results.md: the table, the diverged cells, the plots that exist, the unfinished cells."""
    head = ["dataset", "arch", "method", "ablation", "sparsity", "seeds", "steps"]
    columns = [c[0] for c in MD_COLUMNS] + ["diverged"]
    lines = ["# Sweep results", "",
             ("Mean ± sample standard deviation (n − 1) over seeds; a single seed has no ±. "
             "‖g‖² and gᵀHg: the gradient flow right after pruning "
             "(results.json `gradient_flow.after`), – where the runner did not record it. "
             "Seeds whose run diverged are not among `seeds`; `diverged` counts them."), "",
             "| " + " | ".join(head + columns) + " |",
             "|" + "---|" * 4 + "---:|" * (len(head) - 4 + len(columns))]
    for r in rows:
        # A network trained in another dtype than float32 is named with it: its row
        # is a group of its own (aggregation.GROUP_KEY).
        arch = r["arch"] if r["compute_dtype"] == DEFAULT_COMPUTE_DTYPE else \
            f"{r['arch']} ({r['compute_dtype']})"
        cells = [r["dataset"], arch, r["method"], r["ablation"], f"{r['sparsity']:.2%}",
                 str(len(r["seeds"])), r["steps"] or "–"]
        cells += [_pm(r[f"{key}_mean"], r[f"{key}_std"], fmt) for _, key, fmt in MD_COLUMNS]
        cells.append(str(len(r["diverged"])))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if not rows:
        lines.append("\nNo finished cell yet.")
    lines += _diverged_note(rows)
    for title, path in plots:
        lines += ["", f"![{title}]({path})"]
    if unfinished:
        lines += ["", "Not finished (no complete results.json): " + ", ".join(unfinished)]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """results.csv: full precision, empty where a figure is missing; the diverged seeds and
    their steps last (space-separated, in the same order)."""
    names = [n for n, _ in METRICS]
    header = [*GROUP_KEY, "n_seeds", "seeds", "steps"]
    header += [f"{n}_{s}" for n in names for s in ("mean", "std")]
    header += ["n_diverged", "diverged_seeds", "diverged_at_steps"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        values = [r[k] for k in GROUP_KEY] + [len(r["seeds"]), " ".join(map(str, r["seeds"])),
                                              r["steps"]]
        values += [r[f"{n}_{s}"] for n in names for s in ("mean", "std")]
        values += [len(r["diverged"]), " ".join(str(seed) for seed, _ in r["diverged"]),
                   " ".join(step for _, step in r["diverged"])]
        w.writerow(["" if v is None else v for v in values])
    return buf.getvalue()


def write_tables(sweep_dir: str, plots: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """results.md and results.csv from the finished cells; the rows."""
    results, unfinished = load_results(sweep_dir)
    rows = aggregate(results)
    write_text(paths.join(sweep_dir, RESULTS_MD), to_markdown(rows, unfinished, plots))
    write_text(paths.join(sweep_dir, RESULTS_CSV), to_csv(rows))
    return rows
