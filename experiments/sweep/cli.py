"""The sweep's command line: flags, their cheap checks, and ``main``.

The sweep's own flags are checked at parse time; the grid's names and the
forwarded runner flags by the runner itself (experiments.sweep.validate), and
the sweep directory by the file system, all before anything is written.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from experiments import paths
from experiments.sweep.grid import NO_ABLATION, make_grid
from experiments.sweep.report import write_report
from experiments.sweep.runner import run_grid
from experiments.sweep.sweep_dir import create_sweep_dir, sweep_dir_problem
from experiments.sweep.tables import RESULTS_MD
from experiments.sweep.validate import SweepUsageError, check_with_runner

# Runner flags the sweep names in its own --help and forwards verbatim.
PASS_THROUGH = ("dataset", "arch", "epochs", "max_steps", "batch_size", "data_dir")


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


def _name(what: str) -> Callable[[str], str]:
    """A name that can be part of a directory name; the runner's registry checks it later
    (importing it loads JAX, which the parser must not)."""

    def parse(text: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
            raise argparse.ArgumentTypeError(f"{what} {text!r} is not a plain name")
        return text

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.sweep",
        description="Run a grid of experiments.run cells (methods x sparsities x seeds x "
                    "ablations) one after another, resumably, then write results.md, "
                    "results.csv and PNG plots (mean ± std over seeds) into --sweep_dir.",
        epilog="Flags after `--` are forwarded to every cell's `python -m experiments.run`. "
               "Exit status: 0 all cells finished (done or diverged), 1 a cell failed, "
               "2 bad flags, 128+signal when stopped (rerun to resume).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # "--report" must not silently mean --report_only
    )
    p.add_argument("--sweep_dir", required=True,
                   help="where the cells' workdirs and the report go")
    g = p.add_argument_group("the grid")
    g.add_argument("--methods", type=_list_of(_name("method"), "a list of methods"),
                   default=["grasp", "snip", "synflow", "random"],
                   help="comma-separated; 'dense' adds one unpruned cell per seed")
    g.add_argument("--sparsities", type=_list_of(_sparsity, "a list of sparsities"),
                   default=[0.9, 0.98, 0.99], help="comma-separated, each in [0, 1)")
    g.add_argument("--seeds", type=_list_of(_seed, "a list of seeds"), default=[0, 1],
                   help="comma-separated non-negative integers")
    g.add_argument("--ablations", type=_list_of(_name("ablation"), "a list of ablations"),
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


def main(argv: Sequence[str] | None = None, *, cpu_only: bool = False) -> int:
    """The CLI; ``cpu_only`` keeps this process's JAX off accelerators (see check_with_runner)."""
    own, extra = split_forwarded(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(own)
    problem = sweep_dir_problem(args.sweep_dir, must_exist=args.report_only)
    if problem:
        parser.error(f"--sweep_dir {args.sweep_dir!r} {problem}")
    if args.report_only:
        rows = write_report(args.sweep_dir, args.density_sparsity)
        print(f"report of {len(rows)} rows in {paths.join(args.sweep_dir, RESULTS_MD)}")
        return 0
    cells = make_grid(args.methods, args.sparsities, args.seeds, args.ablations)
    forwarded = forwarded_args(args, extra)
    try:
        num_steps = check_with_runner(cells, forwarded, args.sweep_dir, cpu_only)
    except SweepUsageError as e:
        parser.error(str(e))
    try:
        create_sweep_dir(args.sweep_dir)
    except OSError as e:
        parser.error(f"--sweep_dir {args.sweep_dir!r} cannot be written: {e.strerror or e}")
    return run_grid(cells, forwarded, args.sweep_dir, num_steps, echo=not args.quiet,
                    density_sparsity=args.density_sparsity)
