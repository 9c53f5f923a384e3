"""Running the cells: one ``python -m experiments.run`` subprocess each, one after
another, with their output in ``<cell>/log.txt`` (on a bucket: uploaded whole when the
cell ends); stop signals; resuming.

A cell dies with the sweep: SIGINT, SIGTERM and SIGHUP are passed on as one
SIGTERM (the runner saves a checkpoint and exits 143), and a sweep killed
outright takes its cell with it through the kernel's parent-death signal
(experiments.sweep.launch).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

from experiments import paths
from experiments.outputs import format_duration
from experiments.sweep.grid import Cell
from experiments.sweep.report import write_report
from experiments.sweep.results import (
    DIVERGED,
    DONE,
    RESULTS_JSON,
    cell_state,
    diverged_at,
    read_json,
)
from experiments.sweep.tables import RESULTS_MD, write_tables

CELL_LOG = "log.txt"


# The runner's stop signals (experiments/signals.py): each makes it save and exit 128 + signal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    """A stop signal while a cell runs: ask the cell to save and stop, then stop the sweep.

    The first signal sends SIGTERM to the running cell (the runner checkpoints
    and exits 143); another one kills it. The cell runs in a session of its
    own, so a terminal's Ctrl-C or hang-up reaches the sweep alone and the cell
    gets exactly one signal: the runner takes a second one as "exit at once,
    without saving".
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.child: subprocess.Popen | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:  # noqa: PYI034 (typing.Self needs Python 3.11)
        for s in STOP_SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc: object) -> None:
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
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


@contextlib.contextmanager
def cell_log(cell_dir: str) -> Iterator[BinaryIO]:
    """``<cell_dir>/log.txt`` open for appending.

    On a bucket nothing can be appended to: the log is written to a local
    temporary file (seeded with the log already there, so an interrupted
    attempt's output stays above its resume) and uploaded whole, one object
    write, when the cell ends, however it ends. While a cell runs its output
    is on the sweep's own stdout, and the bucket holds the previous attempt's log.
    """
    path = paths.join(cell_dir, CELL_LOG)
    if not paths.is_url(cell_dir):
        os.makedirs(cell_dir, exist_ok=True)
        with open(path, "ab") as log:
            yield log
        return
    with tempfile.NamedTemporaryFile(prefix="sweep-cell-log-", suffix=".txt") as log:
        if paths.exists(path):
            log.write(paths.read_bytes(path))
        try:
            yield log
        finally:
            log.flush()
            log.seek(0)
            paths.write_bytes(path, log.read())


def run_cell(cmd: Sequence[str], cell_dir: str, echo: bool, stop: StopSignals) -> int:
    """Run ``cmd``, appending its output to ``<cell_dir>/log.txt`` (and echoing it); exit status.

    The process is ``cmd`` itself, started through experiments.sweep.launch so
    that it dies with this one.
    """
    out = getattr(sys.stdout, "buffer", None) if echo else None
    launch = [sys.executable, "-m", "experiments.sweep.launch", str(os.getpid()), *cmd]
    with cell_log(cell_dir) as log:
        # Appended, not truncated: an interrupted attempt's output stays above its resume.
        header = f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(cmd)}\n".encode()
        log.write(header)
        log.flush()
        proc = subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=cell_env(), start_new_session=True)
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


def _log_tail(cell_dir: str, lines: int = 15) -> str:
    try:
        text = paths.read_bytes(paths.join(cell_dir, CELL_LOG)).decode(errors="replace")
    except OSError:
        return ""
    return "".join(text.splitlines(keepends=True)[-lines:])


def _skipped(state: str, cell_dir: str) -> str:
    if state == DIVERGED:
        step = diverged_at(read_json(paths.join(cell_dir, RESULTS_JSON)) or {})
        return (f"diverged at step {step}, skipped (in the report as diverged; remove its "
                "directory to rerun it)")
    return "finished, skipped"


def cell_outcome(cell_dir: str, status: int, took: float, num_steps: int,
                 stop: StopSignals) -> tuple[str, str]:
    """(done | diverged | stopped | failed, the progress line's end) of a cell that ran."""
    state = cell_state(cell_dir, num_steps)
    if state == DIVERGED:  # the runner exits 1, but the cell is finished: not a failure
        step = diverged_at(read_json(paths.join(cell_dir, RESULTS_JSON)) or {})
        return DIVERGED, (f"DIVERGED at step {step} (non-finite loss) after "
                          f"{format_duration(took)}; reported as diverged, in no mean")
    if status == 0 and state == DONE:
        acc = read_json(paths.join(cell_dir, RESULTS_JSON))["final_test_accuracy"]
        acc_text = "none recorded" if acc is None else f"{acc:.2%}"
        return DONE, f"done in {format_duration(took)}, final test accuracy {acc_text}"
    if stop.signum is not None or status in {128 + s for s in STOP_SIGNALS}:
        return "stopped", (f"stopped (exit status {status}); rerun the same command to resume "
                           "from its checkpoint")
    return "failed", f"FAILED with exit status {status}; the end of its log:\n{_log_tail(cell_dir)}"


def run_grid(cells: Sequence[Cell], forwarded: Sequence[str], sweep_dir: str, num_steps: int,
             echo: bool, density_sparsity: float | None = None) -> int:
    """Run the unfinished cells one after another; the sweep's exit status."""
    states = {c: cell_state(paths.join(sweep_dir, c.name), num_steps) for c in cells}
    todo = [c for c in cells if states[c] is None]
    print(f"sweep {sweep_dir}: {len(cells)} cell(s), {len(cells) - len(todo)} finished, "
          f"{len(todo)} to run", flush=True)
    outcomes: dict[str, list[str]] = {"failed": [], DIVERGED: []}
    durations: list[float] = []
    with StopSignals() as stop:
        for i, cell in enumerate(cells, 1):
            head = f"cell {i}/{len(cells)}: {cell.label}"
            cell_dir = paths.join(sweep_dir, cell.name)
            if states[cell] is not None:
                print(f"{head}: {_skipped(states[cell], cell_dir)}", flush=True)
                continue
            if stop.signum is not None:
                break
            cmd = [sys.executable, "-m", "experiments.run", *cell.runner_args(forwarded, cell_dir)]
            left = len(todo) - todo.index(cell)
            eta = f", ETA {format_duration(statistics.mean(durations) * left)}" if durations else ""
            print(f"{head}: running ({left} to run{eta}) -> {cell_dir}/{CELL_LOG}", flush=True)
            start = time.time()
            status = run_cell(cmd, cell_dir, echo, stop)
            kind, line = cell_outcome(cell_dir, status, time.time() - start, num_steps, stop)
            print(f"{head}: {line}", file=sys.stderr if kind == "failed" else sys.stdout,
                  flush=True)
            if kind in (DONE, DIVERGED):
                durations.append(time.time() - start)
                write_tables(sweep_dir)  # a long sweep's partial table is worth having
            if kind == "stopped":
                stop.signum = stop.signum or signal.SIGTERM
            outcomes.setdefault(kind, []).append(cell.name)
    write_report(sweep_dir, density_sparsity)  # also when stopped or failed: what is done counts
    print(f"report in {paths.join(sweep_dir, RESULTS_MD)}", flush=True)
    if outcomes[DIVERGED]:
        print(f"{len(outcomes[DIVERGED])} cell(s) diverged: {', '.join(outcomes[DIVERGED])}",
              flush=True)
    if stop.signum is not None:
        return 128 + stop.signum
    if outcomes["failed"]:
        print(f"{len(outcomes['failed'])} cell(s) failed: {', '.join(outcomes['failed'])}",
              file=sys.stderr)
        return 1
    return 0
