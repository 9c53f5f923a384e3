"""The whole report of a sweep directory: plots first, then the tables that link them."""

from __future__ import annotations

from experiments import paths
from experiments.sweep.aggregation import aggregate, load_results
from experiments.sweep.grid import NO_ABLATION
from experiments.sweep.plots import (
    layer_densities,
    plot_layer_density,
    plot_title,
    plot_vs_sparsity,
)
from experiments.sweep.results import DONE
from experiments.sweep.tables import write_tables

ACCURACY_PNG = "accuracy_vs_sparsity.png"
GRAD_NORM_PNG = "grad_norm_vs_sparsity.png"
DENSITY_PNG = "layer_density.png"


def write_report(sweep_dir: str, density_sparsity: float | None = None) -> list[dict]:
    """Plots, then results.md (linking the plots that exist) and results.csv; the rows.

    The density plot is at ``density_sparsity``, by default the highest
    sparsity of a done pruned cell without ablation.
    """
    results, _ = load_results(sweep_dir)
    rows = aggregate(results)
    plots = []
    if plot_vs_sparsity(rows, "final_test_accuracy", paths.join(sweep_dir, ACCURACY_PNG),
                        ylabel="final test accuracy (%)", scale=100.0):
        plots.append(("test accuracy vs sparsity", ACCURACY_PNG))
    if plot_vs_sparsity(rows, "grad_norm_sq_after", paths.join(sweep_dir, GRAD_NORM_PNG),
                        ylabel="‖g‖² after pruning", log_y=True,
                        reference=("grad_norm_sq_before", "before pruning (mean)")):
        plots.append(("gradient norm after pruning vs sparsity", GRAD_NORM_PNG))
    pruned = [float(r["sparsity_target"]) for r in results
              if r["status"] == DONE and r["method"] != "dense" and r["ablation"] == NO_ABLATION]
    sparsity = density_sparsity if density_sparsity is not None else max(pruned, default=None)
    if sparsity is not None:
        densities = layer_densities(sweep_dir, results, sparsity)
        path = paths.join(sweep_dir, DENSITY_PNG)
        if plot_layer_density(densities, sparsity, plot_title(rows), path):
            plots.append((f"remaining density per layer at sparsity {sparsity:.2%}", DENSITY_PNG))
        else:
            print(f"no layer-density plot: no finished cell with masks.npz at sparsity "
                  f"{sparsity:g} and ablation none", flush=True)
    return write_tables(sweep_dir, plots)
