"""benchmarks.gpu, the script for a lent GPU, run on this CPU at --tiny sizes: it exits 0 and
writes both marked sections of its page (a temporary one, never docs/GPU.md), a spent time
budget skips work instead of running past it, and a machine without the reproduction's data
(a fresh GPU or TPU VM) gets the tables and the command that prepares it.

The script's own process only starts others (the benchmarks, the sweep), so it runs in this
one, except where the test is that it never opens the device: there it is a fresh process."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu

REPO = Path(__file__).resolve().parents[2]
SHARED_TFDS = REPO.parent / "shared" / "tfds"


def _argv(tmp_path, *flags):
    """The script's command line, writing a page that holds prose of its own."""
    out = tmp_path / "GPU.md"
    out.write_text("# hand-written title\n\nprose kept across reruns\n")
    return ["--tiny", "--out", str(out), "--sweep_dir", str(tmp_path / "sweep"), *flags]


def _run(tmp_path, *flags, **env_vars):
    """The script in a fresh process: (its CompletedProcess, the page it wrote)."""
    cmd = [sys.executable, "-m", "benchmarks.gpu", *_argv(tmp_path, *flags)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env_vars)
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return p, (tmp_path / "GPU.md").read_text()


def _run_here(tmp_path, monkeypatch, capfd, *flags):
    """``gpu.main`` in this process, its children started as the script starts them:
    (exit status, everything written to fds 1 and 2, the page it wrote)."""
    # The script sets these for its children, as defaults; leave the test's environment as
    # it was afterwards.
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.chdir(REPO)
    code = gpu.main(_argv(tmp_path, *flags))
    out, err = capfd.readouterr()
    return code, out + err, (tmp_path / "GPU.md").read_text()


def _section(page: str, name: str) -> str:
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    assert page.count(begin) == 1 and page.count(end) == 1, page
    return page.split(begin, 1)[1].split(end, 1)[0]


@pytest.mark.slow
def test_tiny_run_writes_both_tables(tmp_path, monkeypatch, capfd):
    repo_page = REPO / "docs" / "GPU.md"
    before = repo_page.read_bytes() if repo_page.exists() else None
    # One method keeps it to one sweep cell (each cell is a fresh process: ~15 s here).
    code, output, page = _run_here(tmp_path, monkeypatch, capfd, "--methods", "grasp")
    assert code == 0, output
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


def test_spent_budget_skips_every_model_and_the_sweep(tmp_path, monkeypatch, capfd):
    code, output, page = _run_here(tmp_path, monkeypatch, capfd, "--bench_budget_s", "0",
                                   "--budget_s", "0")
    assert code == 0, output
    bench = _section(page, gpu.BENCH_SECTION)
    assert bench.count("| lenet5 | skipped: time budget spent |") == 2, bench
    assert "Not run: the time budget was spent" in _section(page, gpu.SWEEP_SECTION)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_the_page_is_written_by_a_process_that_never_opens_the_device(tmp_path):
    """Only the benchmark child initializes JAX (a TPU admits one process at a time): with no
    usable backend the child fails, and this process still writes its page and exits 1."""
    p, page = _run(tmp_path, "--budget_s", "0", JAX_PLATFORMS="no_such_platform")
    assert p.returncode == 1, p.stdout + p.stderr
    bench = _section(page, gpu.BENCH_SECTION)
    assert "Device: unknown (the benchmark process failed" in bench
    assert "The benchmark process failed (exit 1)" in bench, bench
    assert "Not run: the time budget was spent" in _section(page, gpu.SWEEP_SECTION)


def test_sweep_results_drop_the_title_and_the_plots(tmp_path):
    (tmp_path / "results.md").write_text("# Sweep results\n\nnote\n\n| a |\n|---|\n| 1 |\n\n"
                                         "![accuracy](accuracy_vs_sparsity.png)\n")
    assert gpu.sweep_results(str(tmp_path)) == "note\n\n| a |\n|---|\n| 1 |"
    assert "No cell finished" in gpu.sweep_results(str(tmp_path / "absent"))


def test_skipped_rows_have_as_many_cells_as_their_header():
    for header, columns in ((gpu.GRASP_HEADER, 8), (gpu.TRAIN_HEADER, 6)):
        assert header.splitlines()[0].count("|") == columns + 1
        assert gpu.skipped_row("vgg19", columns).count("|") == columns + 1


@pytest.mark.slow
def test_without_cifar10_the_tables_are_written_and_the_reproduction_says_how_to_prepare_it(
        tmp_path, monkeypatch, capfd):
    absent = tmp_path / "no_tfds_here"
    code, output, page = _run_here(tmp_path, monkeypatch, capfd, "--dataset", "cifar10",
                                   "--data_dir", str(absent))
    assert code == 0, output

    bench = _section(page, gpu.BENCH_SECTION)
    assert "Device: **cpu** (cpu, " in bench
    rows = [ln for ln in bench.splitlines() if ln.startswith("| lenet5 |")]
    assert len(rows) == 2 and all("skipped" not in ln for ln in rows), bench

    sweep = _section(page, gpu.SWEEP_SECTION)
    assert f"Skipped: cifar10 is not prepared in `{absent}`" in sweep, sweep
    assert gpu.prepare_command("cifar10", str(absent)) in sweep
    assert f"tfds build cifar10 --data_dir={absent}" in sweep
    assert "--data_dir /path/to/tensorflow_datasets" in sweep
    assert not absent.exists() and not (tmp_path / "sweep").exists()  # nothing written, no run


def test_the_prepare_command_calls_tfds_on_the_named_directory(tmp_path, monkeypatch):
    """The page's command runs as printed, against TFDS's real API (the download stubbed)."""
    import tensorflow_datasets as tfds

    prepared = []
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        lambda self, **kw: prepared.append((self.name, self.data_dir)))
    argv = shlex.split(gpu.prepare_command("cifar10", str(tmp_path / "tfds")))
    assert argv[:2] == ["python", "-c"]
    exec(argv[2], {})
    assert prepared == [("cifar10", str(tmp_path / "tfds" / "cifar10" / "3.0.2"))]


def test_missing_data_is_none_for_bundled_or_prepared_data(tmp_path):
    assert gpu.missing_data("digits", str(tmp_path / "absent")) is None
    note = gpu.missing_data("cifar10", str(tmp_path / "absent"))
    assert note.startswith("Skipped: cifar10 is not prepared") and "download_and_prepare" in note
    if (SHARED_TFDS / "cifar10").is_dir():
        assert gpu.missing_data("cifar10", str(SHARED_TFDS)) is None


def test_the_sweep_batch_divides_over_the_devices():
    vgg = ("--dataset", "cifar10", "--arch", "vgg19", "--epochs", "3")
    assert gpu.with_batch(vgg, 8) == vgg  # the preset's 128 divides: left to the preset
    assert gpu.with_batch(vgg, 3) == (*vgg, "--batch_size", "126")
    tiny = ("--dataset", "digits", "--arch", "lenet5", "--batch_size", "32")
    assert gpu.with_batch(tiny, 4) == tiny
    assert gpu.with_batch(tiny, 5)[-2:] == ("--batch_size", "30")
    assert gpu.divisible_batch(4, 8) == 8  # at least one image per device
