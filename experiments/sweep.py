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
process costs seconds, a cell minutes to hours.

Resuming. A cell is *finished* when its ``results.json`` is complete (written
by a run that was not preempted) and reached the number of steps the cell now
asks for; finished cells are skipped. Anything else is rerun with the very
same command, which makes the runner resume from the cell's latest checkpoint
(or extend it, when ``--max_steps`` grew). A second invocation with nothing
new to run only rebuilds the report: the same tables, byte for byte.

Outputs in ``--sweep_dir`` (every file written to a temporary name, then
renamed): ``results.md`` and ``results.csv`` (per dataset/arch/method/
sparsity/ablation: mean ± sample std over seeds of final and best test
accuracy, and of ``gradient_flow.after.grad_norm_sq`` / ``gHg`` where the
runner recorded them), ``accuracy_vs_sparsity.png``,
``grad_norm_vs_sparsity.png`` (only with gradient-flow data) and
``layer_density.png`` (remaining density per layer per method at one
sparsity, from each cell's ``masks.npz``). The report covers every finished
cell directory under ``--sweep_dir``, whichever invocation ran it.

Exit status: 0 every cell finished; 1 some cell failed (the others still ran);
2 bad command line (nothing written); 128+signal when stopped by SIGINT or
SIGTERM (the running cell is sent SIGTERM, saves a checkpoint, and resumes on
the next invocation).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from experiments import configs
from experiments.outputs import pyplot, save_png, write_text

# Flags of the runner that the sweep sets per cell; users may not forward them.
OWNED_FLAGS = ("method", "sparsity", "seed", "workdir", "ablation", "overwrite")
# Runner flags the sweep names in its own --help and forwards verbatim.
PASS_THROUGH = ("dataset", "arch", "epochs", "max_steps", "batch_size", "data_dir")
NO_ABLATION = "none"

RESULTS_MD, RESULTS_CSV = "results.md", "results.csv"
ACCURACY_PNG = "accuracy_vs_sparsity.png"
GRAD_NORM_PNG = "grad_norm_vs_sparsity.png"
DENSITY_PNG = "layer_density.png"
CELL_LOG = "log.txt"

# The figures aggregated over seeds: (column name, how to read it from a results.json dict).
METRICS: tuple[tuple[str, Callable[[Mapping[str, Any]], Any]], ...] = (
    ("final_test_accuracy", lambda r: r.get("final_test_accuracy")),
    ("best_test_accuracy", lambda r: r.get("best_test_accuracy")),
    ("grad_norm_sq_after", lambda r: _dig(r, "gradient_flow", "after", "grad_norm_sq")),
    ("gHg_after", lambda r: _dig(r, "gradient_flow", "after", "gHg")),
    ("grad_norm_sq_before", lambda r: _dig(r, "gradient_flow", "before", "grad_norm_sq")),
)
GROUP_KEY = ("dataset", "arch", "method", "sparsity", "ablation")


# --------------------------------------------------------------------------
# The grid.


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    method: str
    sparsity: float  # 0.0 for dense
    seed: int
    ablation: str = NO_ABLATION

    @property
    def name(self) -> str:
        """The cell's directory name; stable, so that a rerun finds the same workdir."""
        if self.method == "dense":
            return f"dense_seed{self.seed}"
        ablation = "" if self.ablation == NO_ABLATION else f"_{self.ablation}"
        # repr: the shortest text that reads back as the same float (":g" rounds 0.9999999 to 1).
        return f"{self.method}_s{self.sparsity!r}{ablation}_seed{self.seed}"

    @property
    def label(self) -> str:
        if self.method == "dense":
            return f"dense seed={self.seed}"
        text = f"{self.method} s={self.sparsity:g} seed={self.seed}"
        return text if self.ablation == NO_ABLATION else f"{text} ablation={self.ablation}"

    def runner_args(self, forwarded: Sequence[str], workdir: str) -> list[str]:
        """The runner's argv: forwarded flags first, so that the cell's own come last and win."""
        args = [*forwarded, "--method", self.method, "--seed", str(self.seed)]
        if self.method != "dense":
            args += ["--sparsity", repr(self.sparsity)]
        if self.ablation != NO_ABLATION:
            # "none" is never passed: the command of a plain cell stays what it was
            # before the runner had ablations, so such cells still resume.
            args += ["--ablation", self.ablation]
        return args + ["--workdir", workdir]


def make_grid(methods: Sequence[str], sparsities: Sequence[float], seeds: Sequence[int],
              ablations: Sequence[str]) -> list[Cell]:
    """Cells in run order: method, then sparsity, then ablation, then seed."""
    cells: list[Cell] = []
    for method in methods:
        if method == "dense":
            # Nothing is pruned, so neither sparsity nor an ablation applies.
            cells += [Cell("dense", 0.0, seed) for seed in seeds]
            continue
        cells += [Cell(method, s, seed, a) for s in sparsities for a in ablations for seed in seeds]
    return cells


# --------------------------------------------------------------------------
# Command line. Cheap checks here; the runner's own checks in check_with_runner.


def _list_of(kind: Callable[[str], Any], what: str) -> Callable[[str], list]:
    """An argparse type: a comma-separated, non-empty list, duplicates dropped."""

    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",")]
        if not any(items):
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list (the grid would be empty)")
        out = []
        for item in items:
            if not item:
                raise argparse.ArgumentTypeError(f"{text!r} has an empty entry")
            value = kind(item)
            if value not in out:
                out.append(value)
        return out

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _method(text: str) -> str:
    if text not in configs.METHODS:
        raise argparse.ArgumentTypeError(
            f"unknown method {text!r}; valid: {', '.join(configs.METHODS)}")
    return text


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"sparsity {text!r} is not a number in [0, 1)")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not a non-negative integer")
    return value


def _name(text: str) -> str:
    # Ablation names are checked against the runner's --ablation choices later;
    # here only that they can be part of a directory name.
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise argparse.ArgumentTypeError(f"ablation {text!r} is not a plain name")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.sweep",
        description="Run a grid of experiments.run cells (methods x sparsities x seeds x "
                    "ablations) one after another, resumably, then write results.md, "
                    "results.csv and PNG plots (mean ± std over seeds) into --sweep_dir.",
        epilog="Flags after `--` are forwarded to every cell's `python -m experiments.run`. "
               "Exit status: 0 all cells finished, 1 a cell failed, 2 bad flags, "
               "128+signal when stopped (rerun to resume).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sweep_dir", required=True,
                   help="where the cells' workdirs and the report go")
    g = p.add_argument_group("the grid")
    g.add_argument("--methods", type=_list_of(_method, "a list of methods"),
                   default=["grasp", "snip", "synflow", "random"],
                   help="comma-separated; 'dense' adds one unpruned cell per seed")
    g.add_argument("--sparsities", type=_list_of(_sparsity, "a list of sparsities"),
                   default=[0.9, 0.98, 0.99], help="comma-separated, each in [0, 1)")
    g.add_argument("--seeds", type=_list_of(_seed, "a list of seeds"), default=[0, 1],
                   help="comma-separated non-negative integers")
    g.add_argument("--ablations", type=_list_of(_name, "a list of ablations"),
                   default=[NO_ABLATION],
                   help="comma-separated: none, or the runner's --ablation choices")
    g = p.add_argument_group("forwarded to experiments.run (its defaults when unset)")
    for name in PASS_THROUGH:
        g.add_argument(f"--{name}", default=None, help=f"the runner's --{name}")
    g = p.add_argument_group("running and reporting")
    g.add_argument("--report_only", action="store_true",
                   help="run nothing: rebuild the tables and plots from the finished cells")
    g.add_argument("--density_sparsity", type=_sparsity, default=None,
                   help="sparsity of the per-layer density plot (default: the highest present)")
    g.add_argument("--quiet", action="store_true",
                   help="show only the sweep's progress lines, not the cells' output "
                        "(it is always in <cell>/log.txt)")
    return p


def split_forwarded(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the sweep's own flags, the flags after the first ``--``)."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def forwarded_args(args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
    """The runner flags every cell gets: the named pass-through ones, then ``extra``."""
    out: list[str] = []
    for name in PASS_THROUGH:
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name}", value]
    return out + list(extra)


def check_with_runner(parser: argparse.ArgumentParser, cells: Sequence[Cell],
                      forwarded: Sequence[str], sweep_dir: str, cpu_only: bool = False) -> int:
    """Validate the forwarded flags and every (method, ablation) with the runner's own
    parser and checks, before anything is written; return the steps a cell trains for.

    Every problem ends the program with exit status 2 and the runner's message.
    With ``cpu_only`` (the CLI) this process stays off any accelerator: it only
    parses, and a GPU backend here would hold memory its cells need for the
    whole sweep. The runner then checks --batch_size against the CPU's device
    count; each cell checks it again against the real devices.
    """
    if cpu_only:
        import jax

        jax.config.update("jax_platforms", "cpu")  # before anything initializes a backend
    from experiments import run

    runner = run.build_parser()
    runner.prog = "python -m experiments.sweep (flags forwarded to experiments.run)"
    given = runner.parse_args(list(forwarded))
    for dest in OWNED_FLAGS:
        if hasattr(given, dest) and getattr(given, dest) != runner.get_default(dest):
            parser.error(f"--{dest} is set by the sweep for each cell; do not forward it "
                         "(use --methods/--sparsities/--seeds/--ablations; remove a cell's "
                         "directory to rerun it from scratch)")
    # argparse keeps no public handle on an option's choices; this dict is stable API in practice.
    action = runner._option_string_actions.get("--ablation")
    for cell in cells:
        if cell.ablation == NO_ABLATION:
            continue
        if action is None:
            parser.error(f"--ablations {cell.ablation}: this experiments.run has no --ablation "
                         "flag yet; only 'none' can run")
        if action.choices is not None and cell.ablation not in action.choices:
            parser.error(f"--ablations: unknown ablation {cell.ablation!r}; valid: none, "
                         + ", ".join(c for c in action.choices if c != NO_ABLATION))
    num_steps = None
    seen = set()
    for cell in cells:
        if (cell.method, cell.ablation) in seen:
            continue  # sparsity and seed are already checked; one config per pair suffices
        seen.add((cell.method, cell.ablation))
        workdir = os.path.join(sweep_dir, cell.name)
        cell_args = runner.parse_args(cell.runner_args(forwarded, workdir))
        config = run.config_from_args(runner, cell_args)
        num_steps = config.num_steps
    assert num_steps is not None  # the grid is never empty
    return num_steps


# --------------------------------------------------------------------------
# Running cells.


def read_json(path: str) -> Optional[dict]:
    """The JSON object in ``path``, or None when it is absent or unreadable."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(results: Optional[Mapping[str, Any]]) -> bool:
    """Whether a results.json dict is a finished run's (the runner writes none when preempted)."""
    needed = ("method", "seed", "sparsity_target", "steps", "final_test_accuracy")
    return (results is not None and not results.get("preempted", False)
            and all(k in results for k in needed))


def cell_finished(cell_dir: str, num_steps: int) -> bool:
    """Complete results that reached ``num_steps`` (more is fine: a run cannot shrink)."""
    results = read_json(os.path.join(cell_dir, "results.json"))
    return is_complete(results) and int(results["steps"]) >= num_steps


class StopSignals:
    """SIGINT/SIGTERM while a cell runs: ask the cell to save and stop, then stop the sweep.

    The first signal sends SIGTERM to the running cell (the runner checkpoints
    and exits 143); another one kills it. The cell shares the sweep's process
    group, so a sweep killed outright does not leave an orphan writing into a
    workdir that the next invocation resumes.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.child: Optional[subprocess.Popen] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        again = self.signum is not None
        self.signum = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGKILL if again else signal.SIGTERM)


def cell_env() -> dict[str, str]:
    """The sweep's environment, with this very ``experiments`` package importable."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # so log.txt and the echo follow the run line by line
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_cell(cmd: Sequence[str], cell_dir: str, echo: bool, stop: StopSignals) -> int:
    """Run ``cmd``, appending its output to ``<cell_dir>/log.txt`` (and echoing it); exit status."""
    os.makedirs(cell_dir, exist_ok=True)
    out = getattr(sys.stdout, "buffer", None) if echo else None
    with open(os.path.join(cell_dir, CELL_LOG), "ab") as log:
        # Appended, not truncated: an interrupted attempt's output stays above its resume.
        header = f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(cmd)}\n".encode()
        log.write(header)
        log.flush()
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=cell_env())
        stop.child = proc
        try:
            # Raw chunks, not lines: nothing waits for a newline.
            while chunk := os.read(proc.stdout.fileno(), 1 << 16):
                log.write(chunk)
                log.flush()
                if out is not None:
                    out.write(chunk)
                    out.flush()
        finally:
            stop.child = None
            proc.stdout.close()
        status = proc.wait()
        log.write(f"=== exit status {status}\n".encode())
    return status


def _duration(seconds: float) -> str:
    # H:MM:SS as the runner prints it (logging_utils.format_duration imports JAX at load).
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def _log_tail(cell_dir: str, lines: int = 15) -> str:
    try:
        with open(os.path.join(cell_dir, CELL_LOG), errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def run_grid(cells: Sequence[Cell], forwarded: Sequence[str], sweep_dir: str, num_steps: int,
             echo: bool, density_sparsity: Optional[float] = None) -> int:
    """Run the unfinished cells one after another; the sweep's exit status."""
    todo = {c for c in cells if not cell_finished(os.path.join(sweep_dir, c.name), num_steps)}
    print(f"sweep {sweep_dir}: {len(cells)} cell(s), {len(cells) - len(todo)} finished, "
          f"{len(todo)} to run", flush=True)
    failed: list[str] = []
    durations: list[float] = []
    with StopSignals() as stop:
        for i, cell in enumerate(cells, 1):
            head = f"cell {i}/{len(cells)}: {cell.label}"
            if cell not in todo:
                print(f"{head}: finished, skipped", flush=True)
                continue
            if stop.signum is not None:
                break
            cell_dir = os.path.join(sweep_dir, cell.name)
            cmd = [sys.executable, "-m", "experiments.run", *cell.runner_args(forwarded, cell_dir)]
            left = len(todo) - len(durations) - len(failed)
            eta = f", ETA {_duration(statistics.mean(durations) * left)}" if durations else ""
            print(f"{head}: running ({left} to run{eta}) -> {cell_dir}/{CELL_LOG}", flush=True)
            start = time.time()
            status = run_cell(cmd, cell_dir, echo, stop)
            took = time.time() - start
            if status == 0 and cell_finished(cell_dir, num_steps):
                durations.append(took)
                acc = read_json(os.path.join(cell_dir, "results.json"))["final_test_accuracy"]
                print(f"{head}: done in {_duration(took)}, final test accuracy {acc:.2%}",
                      flush=True)
                write_tables(sweep_dir)  # a long sweep's partial table is worth having
            elif stop.signum is not None or status == 128 + signal.SIGTERM:
                print(f"{head}: stopped (exit status {status}); rerun the same command to resume "
                      "from its checkpoint", flush=True)
                stop.signum = stop.signum or signal.SIGTERM
            else:
                failed.append(cell.name)
                print(f"{head}: FAILED with exit status {status}; the end of its log:\n"
                      f"{_log_tail(cell_dir)}", file=sys.stderr, flush=True)
    write_report(sweep_dir, density_sparsity)  # also when stopped or failed: what is done counts
    print(f"report in {os.path.join(sweep_dir, RESULTS_MD)}", flush=True)
    if stop.signum is not None:
        return 128 + stop.signum
    if failed:
        print(f"{len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------
# Reading the cells' results and aggregating over seeds.


def _dig(d: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


def load_results(sweep_dir: str) -> tuple[list[dict], list[str]]:
    """(complete results.json dicts of the cell directories, names of unfinished cells).

    Each dict gains ``ablation`` (from results.json, else the cell's
    config.json, else "none") and ``cell`` (its directory name).
    """
    results, unfinished = [], []
    for name in sorted(os.listdir(sweep_dir)):
        cell_dir = os.path.join(sweep_dir, name)
        if not os.path.isdir(cell_dir):
            continue
        r = read_json(os.path.join(cell_dir, "results.json"))
        if not is_complete(r):
            if os.path.exists(os.path.join(cell_dir, "config.json")):
                unfinished.append(name)
            continue
        config = read_json(os.path.join(cell_dir, "config.json")) or {}
        r = dict(r, cell=name)
        r["ablation"] = r.get("ablation") or config.get("ablation") or NO_ABLATION
        results.append(r)
    return results, unfinished


def mean_std(values: Iterable[Any]) -> tuple[Optional[float], Optional[float]]:
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
    method = row["method"]
    rank = configs.METHODS.index(method) if method in configs.METHODS else len(configs.METHODS)
    return (row["dataset"], row["arch"], rank, method, row["sparsity"],
            row["ablation"] != NO_ABLATION, row["ablation"])


def aggregate(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, arch, method, sparsity, ablation) over the seeds.

    ``results`` are results.json dicts (``ablation`` defaults to "none").
    A row has the group key, ``seeds`` (sorted), ``steps`` ("N", or "lo-hi"
    when the seeds differ) and ``<metric>_mean`` / ``<metric>_std`` for each
    of METRICS, None where no seed has the figure.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in results:
        key = (str(r.get("dataset", "")), str(r.get("arch", "")), r["method"],
               float(r["sparsity_target"]),
               r.get("ablation") or NO_ABLATION)
        groups.setdefault(key, []).append(r)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(GROUP_KEY, key))
        row["seeds"] = sorted(int(r["seed"]) for r in members)
        steps = sorted({int(r["steps"]) for r in members})
        row["steps"] = str(steps[0]) if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
        for name, read in METRICS:
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std(read(r) for r in members)
        rows.append(row)
    return sorted(rows, key=_sort_key)


# --------------------------------------------------------------------------
# Tables.


def _pm(mean: Optional[float], std: Optional[float], fmt: Callable[[float], str]) -> str:
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


def to_markdown(rows: Sequence[Mapping[str, Any]], unfinished: Sequence[str] = (),
                plots: Sequence[tuple[str, str]] = ()) -> str:
    """results.md: the table, the plots that exist, the cells not finished yet."""
    head = ["dataset", "arch", "method", "ablation", "sparsity", "seeds", "steps"]
    lines = ["# Sweep results", "",
             "Mean ± sample standard deviation (n − 1) over seeds; a single seed has no ±. "
             "‖g‖² and gᵀHg: the gradient flow right after pruning "
             "(results.json `gradient_flow.after`), – where the runner did not record it.", "",
             "| " + " | ".join(head + [c[0] for c in MD_COLUMNS]) + " |",
             "|" + "---|" * 4 + "---:|" * (len(head) - 4 + len(MD_COLUMNS))]
    for r in rows:
        cells = [r["dataset"], r["arch"], r["method"], r["ablation"], f"{r['sparsity']:.2%}",
                 str(len(r["seeds"])), r["steps"]]
        cells += [_pm(r[f"{key}_mean"], r[f"{key}_std"], fmt) for _, key, fmt in MD_COLUMNS]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if not rows:
        lines.append("\nNo finished cell yet.")
    for title, path in plots:
        lines += ["", f"![{title}]({path})"]
    if unfinished:
        lines += ["", "Not finished (no complete results.json): " + ", ".join(unfinished)]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """results.csv: full precision, empty where a figure is missing."""
    names = [n for n, _ in METRICS]
    header = [*GROUP_KEY, "n_seeds", "seeds", "steps"]
    header += [f"{n}_{s}" for n in names for s in ("mean", "std")]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        values = [r[k] for k in GROUP_KEY] + [len(r["seeds"]), " ".join(map(str, r["seeds"])),
                                              r["steps"]]
        values += [r[f"{n}_{s}"] for n in names for s in ("mean", "std")]
        w.writerow(["" if v is None else v for v in values])
    return buf.getvalue()


def write_tables(sweep_dir: str, plots: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """results.md and results.csv from the finished cells; the rows."""
    results, unfinished = load_results(sweep_dir)
    rows = aggregate(results)
    write_text(os.path.join(sweep_dir, RESULTS_MD), to_markdown(rows, unfinished, plots))
    write_text(os.path.join(sweep_dir, RESULTS_CSV), to_csv(rows))
    return rows


# --------------------------------------------------------------------------
# Plots.


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


def _title(rows: Sequence[Mapping[str, Any]]) -> str:
    setups = sorted({f"{r['arch']} / {r['dataset']}" for r in rows})
    return setups[0] if len(setups) == 1 else "several setups"


def plot_vs_sparsity(rows: Sequence[Mapping[str, Any]], metric: str, path: str, *,
                     ylabel: str, scale: float = 1.0, log_y: bool = False,
                     reference: Optional[tuple[str, str]] = None) -> bool:
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
    ax.set_title(_title(pruned))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    return True


def layer_densities(sweep_dir: str, results: Sequence[Mapping[str, Any]],
                    sparsity: float) -> dict[str, dict[str, float]]:
    """method -> layer -> kept fraction (mean over seeds) at ``sparsity``, ablation "none".

    Read from each cell's ``masks.npz`` (exact booleans per prunable kernel in
    network order, written by the runner beside sparsity.md, which is
    formatted for people).
    """
    import numpy as np

    per_method: dict[str, dict[str, list[float]]] = {}
    for r in results:
        if (r["method"] == "dense" or r["ablation"] != NO_ABLATION
                or not math.isclose(float(r["sparsity_target"]), sparsity)):
            continue
        try:
            with np.load(os.path.join(sweep_dir, r["cell"], "masks.npz")) as masks:
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
    methods = sorted(densities, key=lambda m: (configs.METHODS.index(m)
                                               if m in configs.METHODS else 99, m))
    # Network order: each masks.npz lists its layers in call order (see experiments.report).
    layers = list(dict.fromkeys(name for m in methods for name in densities[m]))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.5, 0.3 * len(layers) * len(methods) + 2.0), 4.2))
    for i, m in enumerate(methods):
        ax.bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(layers))],
               [densities[m].get(name, 0.0) for name in layers], width, label=m)
    ax.axhline(1 - sparsity, color="gray", linestyle="--", linewidth=1,
               label=f"overall {1 - sparsity:.2%}")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=75, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("remaining density (mean over seeds)")
    ax.set_title(f"{title}: sparsity {sparsity:.2%}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    return True


def write_report(sweep_dir: str, density_sparsity: Optional[float] = None) -> list[dict]:
    """Plots, then results.md (linking the plots that exist) and results.csv; the rows."""
    results, _ = load_results(sweep_dir)
    rows = aggregate(results)
    plots = []
    if plot_vs_sparsity(rows, "final_test_accuracy", os.path.join(sweep_dir, ACCURACY_PNG),
                        ylabel="final test accuracy (%)", scale=100.0):
        plots.append(("test accuracy vs sparsity", ACCURACY_PNG))
    if plot_vs_sparsity(rows, "grad_norm_sq_after", os.path.join(sweep_dir, GRAD_NORM_PNG),
                        ylabel="‖g‖² after pruning", log_y=True,
                        reference=("grad_norm_sq_before", "before pruning (mean)")):
        plots.append(("gradient norm after pruning vs sparsity", GRAD_NORM_PNG))
    pruned = [float(r["sparsity_target"]) for r in results
              if r["method"] != "dense" and r["ablation"] == NO_ABLATION]
    sparsity = density_sparsity if density_sparsity is not None else max(pruned, default=None)
    if sparsity is not None:
        densities = layer_densities(sweep_dir, results, sparsity)
        path = os.path.join(sweep_dir, DENSITY_PNG)
        if plot_layer_density(densities, sparsity, _title(rows), path):
            plots.append((f"remaining density per layer at sparsity {sparsity:.2%}", DENSITY_PNG))
        else:
            print(f"no layer-density plot: no finished cell with masks.npz at sparsity "
                  f"{sparsity:g} and ablation none", flush=True)
    return write_tables(sweep_dir, plots)


# --------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None, *, cpu_only: bool = False) -> int:
    """The CLI; ``cpu_only`` keeps this process's JAX off accelerators (see check_with_runner)."""
    own, extra = split_forwarded(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(own)
    if args.report_only:
        if not os.path.isdir(args.sweep_dir):
            parser.error(f"--sweep_dir {args.sweep_dir!r} does not exist")
        rows = write_report(args.sweep_dir, args.density_sparsity)
        print(f"report of {len(rows)} rows in {os.path.join(args.sweep_dir, RESULTS_MD)}")
        return 0
    cells = make_grid(args.methods, args.sparsities, args.seeds, args.ablations)
    forwarded = forwarded_args(args, extra)
    num_steps = check_with_runner(parser, cells, forwarded, args.sweep_dir, cpu_only)
    os.makedirs(args.sweep_dir, exist_ok=True)
    return run_grid(cells, forwarded, args.sweep_dir, num_steps, echo=not args.quiet,
                    density_sparsity=args.density_sparsity)


if __name__ == "__main__":
    sys.exit(main(cpu_only=True))
