"""Real sweeps on scikit-learn's digits (no download), through the CLI: a 4-cell sweep,
its rerun (nothing new runs, same table) and a resumed cell, with the sweep in this process
and each cell a process of its own; a sweep (a process) killed with SIGKILL takes its running
cell with it, and Ctrl-C reaches the cell once."""

import contextlib
import csv
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import sweep
from experiments.sweep import cli as sweep_cli
from tests.helpers.paths import REPO
from tests.helpers.runs import Finished, exit_code

# --------------------------------------------------------------------------
# A real sweep, its rerun and a resumed cell.


def _sweep(out, *extra) -> Finished:
    """The sweep's command line run in this process; its cells are processes of their own."""
    argv = ["--sweep_dir", str(out), "--quiet",
            "--methods", "magnitude,random", "--sparsities", "0.9", "--seeds", "0,1",
            "--dataset", "digits", "--arch", "mlp", "--batch_size", "32", "--max_steps", "2",
            *extra, "--", "--scope", "layerwise"]  # global magnitude 90% empties mlp's classifier
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = sweep_cli.main(argv)
        except SystemExit as e:
            code = exit_code(e)
    return Finished(code, stdout.getvalue(), stderr.getvalue())


def _stat(path):
    s = os.stat(path)
    return s.st_size, s.st_mtime_ns


@pytest.mark.slow
def test_sweep_runs_reruns_nothing_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    cells = ["magnitude_s0.9_seed0", "magnitude_s0.9_seed1", "random_s0.9_seed0",
             "random_s0.9_seed1"]

    p = _sweep(out)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "cell 4/4: random s=0.9 seed=1: done" in p.stdout
    table = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["method"], r["n_seeds"], r["steps"]) for r in table] == [
        ("magnitude", "2", "2"), ("random", "2", "2")]
    for row, method in zip(table, ("magnitude", "random")):
        accs = [json.load(open(out / f"{method}_s0.9_seed{s}" / "results.json"))
                ["final_test_accuracy"] for s in (0, 1)]
        assert float(row["final_test_accuracy_mean"]) == pytest.approx(statistics.fmean(accs))
        assert float(row["final_test_accuracy_std"]) == pytest.approx(statistics.stdev(accs))
    assert (out / sweep.ACCURACY_PNG).exists() and (out / sweep.DENSITY_PNG).exists()
    md, csv_text = (out / "results.md").read_text(), (out / "results.csv").read_text()
    logs = {c: _stat(out / c / "log.txt") for c in cells}
    assert "resuming" not in (out / cells[0] / "log.txt").read_text()

    # Nothing new: every cell skipped, no log touched, the same tables.
    p = _sweep(out)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("finished, skipped") == 4 and "running" not in p.stdout
    assert {c: _stat(out / c / "log.txt") for c in cells} == logs
    assert (out / "results.md").read_text() == md
    assert (out / "results.csv").read_text() == csv_text

    # A cell whose run did not complete (here: its results are gone) is rerun with the
    # same command; the runner resumes it from its checkpoint instead of starting over.
    os.remove(out / cells[2] / "results.json")
    p = _sweep(out)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 to run" in p.stdout and p.stdout.count("finished, skipped") == 3
    log = (out / cells[2] / "log.txt").read_text()
    assert log.count("=== exit status 0") == 2 and "resuming from step 2" in log
    assert {c: _stat(out / c / "log.txt") for c in cells if c != cells[2]} == {
        c: logs[c] for c in cells if c != cells[2]}
    assert (out / "results.csv").read_text() == csv_text


def _processes_naming(text):
    """PIDs of live (not zombie) processes whose command line contains ``text``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone meanwhile
        if text in cmdline and state != "Z":
            pids.append(int(pid))
    return pids


def _wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _long_sweep(out, *forwarded, **popen):
    """A one-cell sweep (random 90%, LeNet-5 on digits) that trains far longer than a test."""
    cmd = [sys.executable, "-m", "experiments.sweep", "--sweep_dir", str(out), "--quiet",
           "--methods", "random", "--sparsities", "0.9", "--seeds", "0", "--dataset", "digits",
           "--arch", "lenet5", "--batch_size", "32", "--epochs", "1000", "--max_steps", "100000",
           "--", *forwarded]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen(cmd, cwd=REPO, env=env, **popen)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_sigkill_of_the_sweep_alone_takes_its_cell(tmp_path):
    out = tmp_path / "sweep"
    cell_dir = out / "random_s0.9_seed0"
    sweep_proc = _long_sweep(out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The cell has started when its run wrote config.json (JAX loaded, training next).
        assert _wait_for(lambda: (cell_dir / "config.json").exists(), 240), "no cell started"
        cells = _processes_naming(f"--workdir {cell_dir}")
        assert len(cells) == 1, cells
        sweep_proc.kill()  # SIGKILL to the sweep process only, not its group
        sweep_proc.wait(timeout=10)
        assert _wait_for(lambda: not _processes_naming(f"--workdir {cell_dir}"), 5), \
            "the cell outlived the sweep"
        assert not (cell_dir / "results.json").exists()
    finally:
        if sweep_proc.poll() is None:
            sweep_proc.kill()
        for pid in _processes_naming(f"--workdir {cell_dir}"):
            os.kill(pid, signal.SIGKILL)  # only if the test failed: no orphan left behind


@pytest.mark.slow
def test_ctrl_c_reaches_the_cell_once_and_it_saves(tmp_path):
    # A terminal's Ctrl-C signals the whole foreground process group. The cell must get
    # one stop signal (the sweep's SIGTERM), not that SIGINT too: a second signal makes
    # the runner exit at once, without saving.
    out = tmp_path / "sweep"
    cell_dir = out / "random_s0.9_seed0"
    sweep_proc = _long_sweep(out, "--log_every_steps", "1", stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # its own group, as a shell's job
    try:
        assert _wait_for(lambda: (cell_dir / "metrics.jsonl").exists(), 240), "no training"
        os.killpg(sweep_proc.pid, signal.SIGINT)
        stdout, _ = sweep_proc.communicate(timeout=120)
    finally:
        if sweep_proc.poll() is None:
            os.killpg(sweep_proc.pid, signal.SIGKILL)
    log = (cell_dir / "log.txt").read_text()
    assert sweep_proc.returncode == 128 + signal.SIGINT, stdout
    assert "stopped (exit status 143)" in stdout
    assert "SIGTERM: saved a checkpoint" in log, log
    assert "SIGINT" not in log and "again: exiting now" not in log, log
    assert "=== exit status 143" in log
