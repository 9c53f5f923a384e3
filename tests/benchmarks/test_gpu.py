"""benchmarks.gpu, the script for a lent GPU, run on this CPU at --tiny sizes (its main in this
process, its sweep's cells in their own): it exits 0 and writes both marked sections of its
page (a temporary one, never docs/GPU.md), and a spent time budget skips work instead of
running past it."""

import contextlib
import io

import pytest

from benchmarks import gpu
from tests.helpers.paths import REPO
from tests.helpers.runs import Finished


def _run(tmp_path, monkeypatch, *flags):
    out = tmp_path / "GPU.md"
    out.write_text("# hand-written title\n\nprose kept across reruns\n")
    argv = ["--tiny", "--out", str(out), "--sweep_dir", str(tmp_path / "sweep"), *flags]
    # main sets these for its sweep's cells if unset; set here, they are restored after.
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = gpu.main(argv)
    return Finished(code, stdout.getvalue(), stderr.getvalue()), out.read_text()


def _section(page: str, name: str) -> str:
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    assert page.count(begin) == 1 and page.count(end) == 1, page
    return page.split(begin, 1)[1].split(end, 1)[0]


@pytest.mark.slow
def test_tiny_run_writes_both_tables(tmp_path, monkeypatch):
    repo_page = REPO / "docs" / "GPU.md"
    before = repo_page.read_bytes() if repo_page.exists() else None
    # One method keeps it to one sweep cell (each cell is a fresh process: ~15 s here).
    p, page = _run(tmp_path, monkeypatch, "--methods", "grasp")
    assert p.returncode == 0, p.stdout + p.stderr
    assert page.startswith("# hand-written title\n\nprose kept across reruns\n")

    bench = _section(page, gpu.BENCH_SECTION)
    assert "Device: **cpu**" in bench
    grasp_rows = [ln for ln in bench.splitlines() if ln.startswith("| lenet5 |")]
    assert len(grasp_rows) == 2, bench  # one in the scoring table, one in the train-step table
    assert all("skipped" not in ln and "n/a" not in ln for ln in grasp_rows), bench
    assert gpu.GRASP_HEADER.splitlines()[0] in bench and gpu.TRAIN_HEADER.splitlines()[0] in bench

    sweep = _section(page, gpu.SWEEP_SECTION)
    assert "Device: **cpu**" in sweep and "(exit 0)" in sweep
    assert "| digits | lenet5 | grasp | none | 98.00% | 1 | 1 |" in sweep, sweep
    assert "![" not in sweep  # the sweep's plots are linked from its own directory only
    assert (tmp_path / "sweep" / "grasp_s0.98_seed0" / "results.json").exists()
    after = repo_page.read_bytes() if repo_page.exists() else None
    assert after == before


def test_spent_budget_skips_every_model_and_the_sweep(tmp_path, monkeypatch):
    p, page = _run(tmp_path, monkeypatch, "--bench_budget_s", "0", "--budget_s", "0")
    assert p.returncode == 0, p.stdout + p.stderr
    bench = _section(page, gpu.BENCH_SECTION)
    assert bench.count("| lenet5 | skipped: time budget spent |") == 2, bench
    assert "Not run: the time budget was spent" in _section(page, gpu.SWEEP_SECTION)
    assert not (tmp_path / "sweep").exists()


def test_sweep_results_drop_the_title_and_the_plots(tmp_path):
    (tmp_path / "results.md").write_text("# Sweep results\n\nnote\n\n| a |\n|---|\n| 1 |\n\n"
                                         "![accuracy](accuracy_vs_sparsity.png)\n")
    assert gpu.sweep_results(str(tmp_path)) == "note\n\n| a |\n|---|\n| 1 |"
    assert "No cell finished" in gpu.sweep_results(str(tmp_path / "absent"))


def test_skipped_rows_have_as_many_cells_as_their_header():
    for header, columns in ((gpu.GRASP_HEADER, 8), (gpu.TRAIN_HEADER, 6)):
        assert header.splitlines()[0].count("|") == columns + 1
        assert gpu.skipped_row("vgg19", columns).count("|") == columns + 1
