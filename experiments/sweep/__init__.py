"""``python -m experiments.sweep``: a resumable grid of runs, then tables and plots.

    python -m experiments.sweep --sweep_dir runs/sweep_c10 --dataset cifar10 --arch resnet32 \\
        --methods grasp,snip,synflow,random --sparsities 0.9,0.98,0.99 --seeds 0,1 --epochs 10
    python -m experiments.sweep --sweep_dir runs/sweep_c10 ... -- --scope layerwise --lr 0.05
    python -m experiments.sweep --sweep_dir runs/sweep_c10 --report_only

The grid is methods x sparsities x seeds x ablations (``dense``, if listed, is
one unpruned cell per seed). Each cell is one ``python -m experiments.run``
with ``--method/--sparsity/--seed[/--ablation] --workdir <sweep_dir>/<cell>``
plus the forwarded runner flags (``--dataset --arch --epochs --max_steps
--batch_size --data_dir`` and everything after ``--``); its output is appended
to ``<cell>/log.txt`` and echoed unless ``--quiet``.

Why a subprocess per cell rather than calling the runner in-process: each cell
gets a clean JAX (no compilation caches or device buffers piling up over a
long grid), a crash, OOM or ``sys.exit`` in one cell cannot take the sweep's
bookkeeping down with it, and the runner's own protocol (SIGTERM -> save a
checkpoint -> exit 143; same command -> resume) works unchanged. Starting a
process costs seconds, a cell minutes to hours. A cell never outlives the
sweep, even one killed with SIGKILL (see ``launch``).

Resuming. A cell is *finished* when its ``results.json`` is complete (written
by a run that was not preempted) and reached the number of steps the cell now
asks for, or says the run diverged (a non-finite loss; a rerun would diverge
again); finished cells are skipped. Anything else is rerun with the very
same command, which makes the runner resume from the cell's latest checkpoint
(or extend it, when ``--max_steps`` grew). A second invocation with nothing
new to run only rebuilds the report: the same tables, byte for byte.

Outputs in ``--sweep_dir`` (every file written to a temporary name, then
renamed): ``results.md`` and ``results.csv`` (per dataset/arch/method/
sparsity/ablation: mean ± sample std over seeds of final and best test
accuracy, and of ``gradient_flow.after.grad_norm_sq`` / ``gHg`` where the
runner recorded them; diverged seeds counted and listed with their step, in
no mean), ``accuracy_vs_sparsity.png``, ``grad_norm_vs_sparsity.png`` (only
with gradient-flow data) and ``layer_density.png`` (remaining density per
layer per method at one sparsity, from each cell's ``masks.npz``). The report
covers every finished cell directory under ``--sweep_dir``, whichever
invocation ran it. ``--report_only`` loads no JAX.

Exit status: 0 every cell finished (done or diverged); 1 some cell failed
(the others still ran); 2 bad command line or unusable ``--sweep_dir``
(nothing written); 128+signal when stopped by SIGINT, SIGTERM or SIGHUP (the
running cell is sent one SIGTERM, saves a checkpoint, and resumes on the next
invocation).

The parts: ``grid`` (cells, their names and runner argv), ``validate`` (the
runner's checks of every cell, before anything is written), ``sweep_dir``,
``runner`` (cells as subprocesses, signals, resuming) and ``launch`` (a cell
dies with the sweep), ``results`` (one cell's status), ``aggregation`` (mean ±
std over seeds), ``tables``, ``plots`` and ``report``, ``cli``.
"""

from experiments.sweep.aggregation import METRICS, aggregate, load_results, mean_std
from experiments.sweep.cli import build_parser, main
from experiments.sweep.grid import NO_ABLATION, Cell, make_grid
from experiments.sweep.plots import layer_densities, plot_layer_density, plot_vs_sparsity
from experiments.sweep.report import ACCURACY_PNG, DENSITY_PNG, GRAD_NORM_PNG, write_report
from experiments.sweep.results import cell_finished, is_complete, is_diverged, read_json
from experiments.sweep.runner import CELL_LOG, run_grid
from experiments.sweep.tables import RESULTS_CSV, RESULTS_MD, to_csv, to_markdown, write_tables
from experiments.sweep.validate import check_with_runner

__all__ = [
    "ACCURACY_PNG", "CELL_LOG", "DENSITY_PNG", "GRAD_NORM_PNG", "METRICS", "NO_ABLATION",
    "RESULTS_CSV", "RESULTS_MD", "Cell", "aggregate", "build_parser", "cell_finished",
    "check_with_runner", "is_complete", "is_diverged", "layer_densities", "load_results",
    "main", "make_grid", "mean_std", "plot_layer_density", "plot_vs_sparsity", "read_json",
    "run_grid", "to_csv", "to_markdown", "write_report", "write_tables",
]
