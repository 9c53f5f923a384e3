"""experiments.sweep: the grid, resuming, the aggregation math, the report, bad flags.

The aggregation and the report are pinned on synthetic results.json files (no
training); one end-to-end test runs a real 4-cell sweep on scikit-learn's
digits (no download) through the CLI, reruns it (nothing new runs, same
table) and resumes a cell whose results were lost.
"""

import csv
import io
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import sweep

REPO = Path(__file__).resolve().parents[1]


def _results(method, sparsity, seed, acc, *, best=None, steps=2, ablation=None, flow=None):
    """A results.json dict with the keys the runner writes (experiments/train.py)."""
    r = {"arch": "mlp", "dataset": "digits", "method": method, "seed": seed, "steps": steps,
         "preempted": False, "sparsity_target": sparsity, "sparsity_reached": sparsity,
         "final_test_accuracy": acc, "best_test_accuracy": acc if best is None else best,
         "final_test_loss": 1.0, "best_step": steps, "wall_time_s": 1.0}
    if ablation is not None:
        r["ablation"] = ablation
    if flow is not None:
        r["gradient_flow"] = {"before": {"loss": 2.3, "grad_norm_sq": 10.0, "gHg": 1.0},
                              "after": {"loss": 2.3, "grad_norm_sq": flow[0], "gHg": flow[1]}}
    return r


# --------------------------------------------------------------------------
# Pure functions.


def test_mean_std_is_sample_std_and_skips_missing():
    assert sweep.mean_std([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.1))
    assert sweep.mean_std([1.0, None, float("nan"), 3.0]) == pytest.approx((2.0, 2 ** 0.5))
    assert sweep.mean_std([0.25]) == (0.25, None)
    assert sweep.mean_std([None, True]) == (None, None)


def test_aggregate_groups_and_math():
    results = [
        _results("snip", 0.9, 0, 0.40),
        _results("grasp", 0.98, 1, 0.20, flow=(2.0, -1.0)),
        _results("grasp", 0.9, 0, 0.50, best=0.55, flow=(1.0, 4.0)),
        _results("grasp", 0.9, 1, 0.60, best=0.65, flow=(3.0, 8.0)),
        _results("grasp", 0.9, 2, 0.70, best=0.75),  # a seed without diagnostics
        _results("grasp", 0.9, 0, 0.10, ablation="shuffle", steps=1),
        _results("grasp", 0.9, 1, 0.30, ablation="shuffle", steps=2),
        _results("dense", 0.0, 0, 0.90),
    ]
    rows = sweep.aggregate(results)
    keys = [(r["method"], r["sparsity"], r["ablation"]) for r in rows]
    # Methods in the runner's registry order, then sparsity, then "none" before ablations.
    assert keys == [("grasp", 0.9, "none"), ("grasp", 0.9, "shuffle"), ("grasp", 0.98, "none"),
                    ("snip", 0.9, "none"), ("dense", 0.0, "none")]
    g = rows[0]
    assert g["seeds"] == [0, 1, 2] and g["steps"] == "2"
    assert g["final_test_accuracy_mean"] == pytest.approx(0.6)
    assert g["final_test_accuracy_std"] == pytest.approx(0.1)
    assert g["best_test_accuracy_mean"] == pytest.approx(0.65)
    assert g["best_test_accuracy_std"] == pytest.approx(0.1)
    assert g["grad_norm_sq_after_mean"] == pytest.approx(2.0)
    assert g["grad_norm_sq_after_std"] == pytest.approx(2 ** 0.5)
    assert g["gHg_after_mean"] == pytest.approx(6.0)
    assert g["grad_norm_sq_before_mean"] == pytest.approx(10.0)
    shuffled = rows[1]
    assert shuffled["steps"] == "1-2"
    assert shuffled["final_test_accuracy_mean"] == pytest.approx(0.2)
    assert rows[2]["final_test_accuracy_std"] is None  # one seed: no spread
    assert rows[3]["grad_norm_sq_after_mean"] is None  # no diagnostics at all

    md = sweep.to_markdown(rows)
    assert ("| digits | mlp | grasp | none | 90.00% | 3 | 2 | 60.00 ± 10.00 | 65.00 ± 10.00 | "
            "2 ± 1.41 | 6 ± 2.83 |") in md
    assert "| digits | mlp | snip | none | 90.00% | 1 | 2 | 40.00 | 40.00 | – | – |" in md
    table = list(csv.DictReader(io.StringIO(sweep.to_csv(rows))))
    assert len(table) == 5
    assert float(table[0]["final_test_accuracy_std"]) == pytest.approx(0.1)
    assert table[0]["seeds"] == "0 1 2" and table[3]["grad_norm_sq_after_mean"] == ""


def test_cells_names_and_runner_args():
    cells = sweep.make_grid(["grasp", "dense"], [0.9, 0.98], [0, 1], ["none", "invert"])
    assert len(cells) == 2 * 2 * 2 + 2  # dense: once per seed, no sparsity or ablation
    assert [c.name for c in cells[:3]] == ["grasp_s0.9_seed0", "grasp_s0.9_seed1",
                                           "grasp_s0.9_invert_seed0"]
    assert cells[-1].name == "dense_seed1"
    args = cells[2].runner_args(["--arch", "mlp"], "d/w")
    assert args == ["--arch", "mlp", "--method", "grasp", "--seed", "0", "--sparsity", "0.9",
                    "--ablation", "invert", "--workdir", "d/w"]
    # "none" is never passed, so pre-ablation runs keep their command; dense has no sparsity.
    assert "--ablation" not in cells[0].runner_args([], "w")
    assert "--sparsity" not in cells[-1].runner_args([], "w")


def test_cell_finished_needs_complete_results_with_enough_steps(tmp_path):
    assert not sweep.cell_finished(str(tmp_path), 2)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results("grasp", 0.9, 0, 0.5, steps=2)))
    assert sweep.cell_finished(str(tmp_path), 2) and not sweep.cell_finished(str(tmp_path), 3)
    path.write_text(json.dumps(dict(_results("grasp", 0.9, 0, 0.5), preempted=True)))
    assert not sweep.cell_finished(str(tmp_path), 2)
    path.write_text("{trunc")
    assert not sweep.cell_finished(str(tmp_path), 2)


# --------------------------------------------------------------------------
# The report from synthetic cells.


def _fake_cell(root, name, results, *, masks=True):
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"method": results["method"]}))
    (d / "results.json").write_text(json.dumps(results))
    if masks:
        keep = 1.0 - results["sparsity_target"]
        rng = np.random.default_rng(results["seed"])
        np.savez(d / "masks.npz", **{f"fc{i}/kernel": rng.random((20, 10)) < keep for i in (1, 2)},
                 **{"classifier/kernel": rng.random((10, 10)) < keep})


def test_report_from_cells(tmp_path, capsys):
    for m in ("grasp", "random"):
        for s in (0.9, 0.98):
            for seed in (0, 1):
                r = _results(m, s, seed, 0.5 + 0.1 * seed, flow=(1e-3 * (1 + seed), 1e-4))
                _fake_cell(tmp_path, f"{m}_s{s!r}_seed{seed}", r)
    (tmp_path / "snip_s0.9_seed0").mkdir()  # started, never finished
    (tmp_path / "snip_s0.9_seed0" / "config.json").write_text("{}")

    assert sweep.main(["--sweep_dir", str(tmp_path), "--report_only"]) == 0
    md = (tmp_path / "results.md").read_text()
    assert md.count("| digits | mlp |") == 4
    assert "55.00 ± 7.07" in md  # mean 0.55, sample std of (0.5, 0.6)
    assert "Not finished (no complete results.json): snip_s0.9_seed0" in md
    for png in (sweep.ACCURACY_PNG, sweep.GRAD_NORM_PNG, sweep.DENSITY_PNG):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in md
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # atomic writes cleaned up

    # Layer densities are read from masks.npz, averaged over seeds, at the chosen sparsity.
    results, _ = sweep.load_results(str(tmp_path))
    dens = sweep.layer_densities(str(tmp_path), results, 0.98)
    assert set(dens) == {"grasp", "random"} and set(dens["grasp"]) == {"fc1", "fc2", "classifier"}
    with np.load(tmp_path / "grasp_s0.98_seed0" / "masks.npz") as a, \
            np.load(tmp_path / "grasp_s0.98_seed1" / "masks.npz") as b:
        expect = statistics.fmean([a["fc1/kernel"].mean(), b["fc1/kernel"].mean()])
    assert dens["grasp"]["fc1"] == pytest.approx(expect)
    assert list(dens["grasp"]) == ["fc1", "fc2", "classifier"]  # the order of masks.npz


def test_report_without_gradient_flow_skips_that_plot(tmp_path):
    for seed in (0, 1):
        _fake_cell(tmp_path, f"random_s0.9_seed{seed}", _results("random", 0.9, seed, 0.5),
                   masks=False)
    rows = sweep.write_report(str(tmp_path))
    assert len(rows) == 1
    assert (tmp_path / sweep.ACCURACY_PNG).exists()
    assert not (tmp_path / sweep.GRAD_NORM_PNG).exists()
    assert not (tmp_path / sweep.DENSITY_PNG).exists()  # no masks.npz: skipped, not an error


# --------------------------------------------------------------------------
# Bad flags: exit status 2, the bad value named, nothing written.


@pytest.mark.parametrize("flags, named", [
    (["--methods", "grasp,nope"], "'nope'"),
    (["--sparsities", "0.9,1.0"], "'1.0'"),
    (["--sparsities", "-0.1"], "'-0.1'"),
    (["--seeds", ""], "empty"),
    (["--methods", ","], "empty"),
    (["--seeds", "0,x"], "'x'"),
])
def test_bad_grid_flags_exit_2(tmp_path, capsys, flags, named):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as e:
        sweep.main(["--sweep_dir", str(out), *flags])
    assert e.value.code == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flags, named", [
    (["--", "--seed", "3"], "--seed"),  # the sweep sets it per cell
    (["--", "--overwrite"], "--overwrite"),
    (["--arch", "nonet"], "'nonet'"),  # checked by the runner's own parser
    (["--arch", "vgg19"], "vgg19"),  # ... and its checks (8x8 digits vanish in VGG19)
    (["--", "--bogus", "1"], "--bogus"),
    (["--ablations", "none,bogus"], "bogus"),  # not among the runner's --ablation choices
])
def test_bad_forwarded_flags_exit_2(tmp_path, capsys, flags, named):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as e:
        sweep.main(["--sweep_dir", str(out), "--dataset", "digits", *flags])
    assert e.value.code == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_cli_exit_status_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "experiments.sweep", "--sweep_dir",
                        str(tmp_path / "s"), "--sparsities", "0.99,2"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "'2' is not a number in [0, 1)" in p.stderr
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------
# A real sweep, its rerun and a resumed cell.


def _sweep(out, *extra):
    cmd = [sys.executable, "-m", "experiments.sweep", "--sweep_dir", str(out), "--quiet",
           "--methods", "magnitude,random", "--sparsities", "0.9", "--seeds", "0,1",
           "--dataset", "digits", "--arch", "mlp", "--batch_size", "32", "--max_steps", "2",
           *extra]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


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
