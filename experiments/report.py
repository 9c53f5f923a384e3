"""What a run leaves in its workdir besides checkpoints and metrics.

``sparsity.md`` (per-layer Markdown table), ``density.png`` (remaining density
per layer), ``masks.npz`` (the keep-masks by layer name, loadable without
orbax) and ``results.json``; plus the results table the demo prints. Every
file is written to a temporary name and renamed, so it is whole or absent.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

import grasp_jax as gj
from grasp_jax.prunable import named_leaves

from experiments import paths
from experiments.config_schema import Config
from experiments.outputs import pyplot, save_png, write_bytes_with, write_text

PyTree = Any


def in_network_order(report: gj.masks.SparsityReport,
                     order: Sequence[str]) -> gj.masks.SparsityReport:
    """``report`` with its layers sorted by ``order`` (module paths in call
    order, from ``models.layer_order``); layers it does not name go last."""
    rank = {path: i for i, path in enumerate(order)}

    def key(layer: gj.masks.LayerDensity) -> int:
        return rank.get(layer.name.rsplit("/", 1)[0], len(rank))

    return dataclasses.replace(report, layers=tuple(sorted(report.layers, key=key)))


def write_sparsity_markdown(path: str, report: gj.masks.SparsityReport, config: Config) -> None:
    title = (f"# Sparsity: {config.method} on {config.arch} / {config.dataset}, "
             f"target {config.sparsity:.2%}\n\n")
    write_text(path, title + report.to_markdown() + "\n")


def save_density_plot(path: str, report: gj.masks.SparsityReport, config: Config) -> None:
    """A bar per prunable layer: the fraction of its weights the masks keep."""
    plt = pyplot()
    names = [layer.name.removesuffix("/kernel") for layer in report.layers]
    density = [layer.density for layer in report.layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2.0), 4.0))
    ax.bar(range(len(names)), density, color="tab:blue")
    ax.axhline(report.density, color="tab:red", linestyle="--", linewidth=1,
               label=f"overall {report.density:.2%}")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("remaining density")
    ax.set_title(f"{config.method} {config.sparsity:.0%} on {config.arch} / {config.dataset}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    save_png(fig, path)


def save_masks(path: str, masks: PyTree, names: Sequence[str] = ()) -> None:
    """``masks.npz``: one boolean array per prunable leaf, keyed by its path name,
    stored in the order of ``names`` (the archive keeps it; others follow)."""
    flags = gj.prunable.prunable_flags(masks)
    named = dict((n, np.asarray(m, bool)) for (n, m), f in zip(named_leaves(masks), flags) if f)
    ordered = [n for n in names if n in named] + [n for n in named if n not in names]
    write_bytes_with(path, lambda f: np.savez_compressed(f, **{n: named[n] for n in ordered}))


SPARSE_PARAMS = "sparse_params.npz"


def save_sparse_params(path: str, params: PyTree, masks: PyTree) -> int:
    """``gj.save_sparse`` of the trained network, atomically; its size in bytes.
    ``gj.load_sparse(path)`` rebuilds the dense params."""
    if not paths.is_url(path):
        tmp = f"{path}.tmp-{os.getpid()}.npz"
        size = gj.save_sparse(tmp, params, masks)
        os.replace(tmp, path)
        return size
    # An object store: build the artifact in a local temporary file, then one object write.
    with tempfile.TemporaryDirectory() as local:
        tmp = os.path.join(local, SPARSE_PARAMS)
        size = gj.save_sparse(tmp, params, masks)
        with open(tmp, "rb") as f:
            data = f.read()
    write_bytes_with(path, lambda f: f.write(data))
    return size


def _finite_or_none(v: Any) -> Any:
    # Strict JSON has no NaN/Infinity; an unknown figure is null.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path: str, data: Mapping[str, Any]) -> None:
    data = {k: _finite_or_none(v) for k, v in data.items()}
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def results_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A small Markdown table of results.json dicts (the demo's output)."""
    lines = ["| method | sparsity | test acc (final) | test acc (best) | steps | wall time |",
             "|---|---:|---:|---:|---:|---:|"]
    def pct(v: Any) -> str:
        return "-" if v is None else f"{v:.2%}"

    for r in rows:
        lines.append(
            f"| {r['method']} | {pct(r['sparsity_reached'])} | {pct(r['final_test_accuracy'])} | "
            f"{pct(r['best_test_accuracy'])} | {r['steps']} | {r['wall_time_s']:.0f}s |"
        )
    return "\n".join(lines)
