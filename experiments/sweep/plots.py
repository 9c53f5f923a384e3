"""The sweep's PNG plots: a figure against sparsity, and remaining density per layer."""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from experiments import paths
from experiments.outputs import pyplot, save_layer_bars, save_png
from experiments.sweep.aggregation import method_rank
from experiments.sweep.grid import NO_ABLATION
from experiments.sweep.results import DONE


def _series(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Pruned rows by line label: method (+ ablation, + arch/dataset when several)."""
    setups = {(r["dataset"], r["arch"]) for r in rows}
    out: dict[str, list] = {}
    for r in rows:
        label = r["method"] if r["ablation"] == NO_ABLATION else f"{r['method']} ({r['ablation']})"
        if len(setups) > 1:
            label += f" [{r['arch']}/{r['dataset']}]"
        out.setdefault(label, []).append(r)
    return out


def plot_title(rows: Sequence[Mapping[str, Any]]) -> str:
    """The plots' title: the one arch / dataset, or "several setups"."""
    setups = sorted({f"{r['arch']} / {r['dataset']}" for r in rows})
    return setups[0] if len(setups) == 1 else "several setups"
def plot_vs_sparsity(rows: Sequence[Mapping[str, Any]], metric: str, path: str, *,
                     ylabel: str, scale: float = 1.0, log_y: bool = False,
                     reference: tuple[str, str] | None = None) -> bool:
    """``metric`` (mean, std error bars) against sparsity, a line per method; False if no data.

    Sparsities sit at evenly spaced positions: 90%, 98% and 99% would crowd a
    linear axis. Dense runs are a horizontal line, and so is ``reference``
    = (metric, label) averaged over all rows (e.g. the unpruned network's figure).
    """
    def ok(r: Mapping[str, Any]) -> bool:
        m = r[f"{metric}_mean"]
        return m is not None and (m > 0 or not log_y)

    pruned = [r for r in rows if r["method"] != "dense" and ok(r)]
    dense = [r for r in rows if r["method"] == "dense" and ok(r)]
    if not pruned:
        return False
    plt = pyplot()
    xs = sorted({r["sparsity"] for r in pruned})
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, series in _series(pruned).items():
        series = sorted(series, key=lambda r: r["sparsity"])
        ax.errorbar([xs.index(r["sparsity"]) for r in series],
                    [scale * r[f"{metric}_mean"] for r in series],
                    yerr=[scale * (r[f"{metric}_std"] or 0.0) for r in series],
                    marker="o", capsize=3, label=label)
    for r in dense:
        ax.axhline(scale * r[f"{metric}_mean"], color="gray", linestyle="--", linewidth=1,
                   label="dense" if len(dense) == 1 else f"dense [{r['arch']}/{r['dataset']}]")
    if reference is not None:
        ref = [r[f"{reference[0]}_mean"] for r in rows if r[f"{reference[0]}_mean"] is not None]
        if ref and (statistics.fmean(ref) > 0 or not log_y):
            ax.axhline(scale * statistics.fmean(ref), color="black", linestyle=":", linewidth=1,
                       label=reference[1])
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([f"{100 * s:g}%" for s in xs])
    ax.set_xlabel("sparsity (fraction of weights pruned)")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(plot_title(pruned))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    return True


def layer_densities(sweep_dir: str, results: Sequence[Mapping[str, Any]],
                    sparsity: float) -> dict[str, dict[str, float]]:
    """method -> layer -> kept fraction (mean over the done seeds) at ``sparsity``, ablation
    "none"; diverged cells are left out, as from every mean.

    Read from each cell's ``masks.npz`` (exact booleans per prunable kernel in
    network order, written by the runner beside sparsity.md, which is
    formatted for people).
    """
    import numpy as np

    per_method: dict[str, dict[str, list[float]]] = {}
    for r in results:
        if (r.get("status", DONE) != DONE or r["method"] == "dense" or r["ablation"] != NO_ABLATION
                or not math.isclose(float(r["sparsity_target"]), sparsity)):
            continue
        try:
            masks_npz = io.BytesIO(paths.read_bytes(paths.join(sweep_dir, r["cell"], "masks.npz")))
            with np.load(masks_npz) as masks:
                layers = per_method.setdefault(r["method"], {})
                for name in masks.files:
                    layers.setdefault(name.removesuffix("/kernel"), []).append(
                        float(np.mean(masks[name])))
        except (OSError, ValueError):
            continue  # a cell without readable masks is left out of this plot only
    return {m: {k: statistics.fmean(v) for k, v in layers.items()}
            for m, layers in per_method.items()}


def plot_layer_density(densities: Mapping[str, Mapping[str, float]], sparsity: float,
                       title: str, path: str) -> bool:
    """Grouped bars: remaining density of each layer, a bar per method; False if no data."""
    if not densities:
        return False
    plt = pyplot()
    methods = sorted(densities, key=method_rank)
    # Network order: each masks.npz lists its layers in call order (see experiments.report).
    layers = list(dict.fromkeys(name for m in methods for name in densities[m]))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.5, 0.3 * len(layers) * len(methods) + 2.0), 4.2))
    for i, m in enumerate(methods):
        ax.bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(layers))],
               [densities[m].get(name, 0.0) for name in layers], width, label=m)
    ax.axhline(1 - sparsity, color="gray", linestyle="--", linewidth=1,
               label=f"overall {1 - sparsity:.2%}")
    save_layer_bars(fig, ax, path, layers, ylabel="remaining density (mean over seeds)",
                    title=f"{title}: sparsity {sparsity:.2%}")
    return True
