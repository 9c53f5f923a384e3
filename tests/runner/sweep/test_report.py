"""experiments.sweep on synthetic results.json files (no training): the grid, when a
cell is finished, the aggregation math, the tables and plots, diverged cells.
"""

import csv
import io
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

from experiments import sweep
from experiments.sweep import aggregation, runner
from experiments.sweep.grid import covering_cells
from tests.helpers.paths import REPO
from tests.helpers.sweep_cells import diverged_json, fake_cell, results_json

# --------------------------------------------------------------------------
# Pure functions.


def test_mean_std_is_sample_std_and_skips_missing():
    assert sweep.mean_std([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.1))
    assert sweep.mean_std([1.0, None, float("nan"), 3.0]) == pytest.approx((2.0, 2 ** 0.5))
    assert sweep.mean_std([0.25]) == (0.25, None)
    assert sweep.mean_std([None, True]) == (None, None)


def test_aggregate_groups_and_math():
    results = [
        results_json("snip", 0.9, 0, 0.40),
        results_json("grasp", 0.98, 1, 0.20, flow=(2.0, -1.0)),
        results_json("grasp", 0.9, 0, 0.50, best=0.55, flow=(1.0, 4.0)),
        results_json("grasp", 0.9, 1, 0.60, best=0.65, flow=(3.0, 8.0)),
        results_json("grasp", 0.9, 2, 0.70, best=0.75),  # a seed without diagnostics
        results_json("grasp", 0.9, 0, 0.10, ablation="shuffle", steps=1),
        results_json("grasp", 0.9, 1, 0.30, ablation="shuffle", steps=2),
        results_json("dense", 0.0, 0, 0.90),
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


def test_aggregate_never_averages_runs_of_two_compute_dtypes(tmp_path):
    older = results_json("grasp", 0.9, 0, 0.50)  # before --compute_dtype: float32
    rows = sweep.aggregate([older, {**results_json("grasp", 0.9, 1, 0.70),
                                    "compute_dtype": "float32"},
                            {**results_json("grasp", 0.9, 0, 0.30), "compute_dtype": "bfloat16"}])
    assert [(r["compute_dtype"], r["seeds"]) for r in rows] == [("float32", [0, 1]),
                                                               ("bfloat16", [0])]
    assert rows[0]["final_test_accuracy_mean"] == pytest.approx(0.6)
    assert rows[1]["final_test_accuracy_mean"] == pytest.approx(0.3)
    md = sweep.to_markdown(rows)
    assert "| digits | mlp (bfloat16) | grasp | none | 90.00% | 1 |" in md
    table = list(csv.DictReader(io.StringIO(sweep.to_csv(rows))))
    assert [t["compute_dtype"] for t in table] == ["float32", "bfloat16"]
    # A cell directory's results.json without the field is float32 on loading, too.
    cell = tmp_path / "grasp_s0"
    cell.mkdir()
    (cell / "results.json").write_text(json.dumps({**older, "status": "done"}))
    loaded, _ = sweep.load_results(str(tmp_path))
    assert loaded[0]["compute_dtype"] == "float32"


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
    path.write_text(json.dumps(results_json("grasp", 0.9, 0, 0.5, steps=2)))
    assert sweep.cell_finished(str(tmp_path), 2) and not sweep.cell_finished(str(tmp_path), 3)
    path.write_text(json.dumps(dict(results_json("grasp", 0.9, 0, 0.5), preempted=True)))
    assert not sweep.cell_finished(str(tmp_path), 2)
    path.write_text("{trunc")
    assert not sweep.cell_finished(str(tmp_path), 2)


# --------------------------------------------------------------------------
# The report from synthetic cells.


def test_report_from_cells(tmp_path, capsys):
    for m in ("grasp", "random"):
        for s in (0.9, 0.98):
            for seed in (0, 1):
                r = results_json(m, s, seed, 0.5 + 0.1 * seed, flow=(1e-3 * (1 + seed), 1e-4))
                fake_cell(tmp_path, f"{m}_s{s!r}_seed{seed}", r)
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
        fake_cell(tmp_path, f"random_s0.9_seed{seed}", results_json("random", 0.9, seed, 0.5),
                   masks=False)
    rows = sweep.write_report(str(tmp_path))
    assert len(rows) == 1
    assert (tmp_path / sweep.ACCURACY_PNG).exists()
    assert not (tmp_path / sweep.GRAD_NORM_PNG).exists()
    assert not (tmp_path / sweep.DENSITY_PNG).exists()  # no masks.npz: skipped, not an error


def test_covering_cells_hold_every_pair_seed_and_sparsity():
    cells = sweep.make_grid(["grasp", "snip", "dense"], [0.9, 0.98, 0.99], [0, 1, 2],
                            ["none", "invert"])
    cover = covering_cells(cells)
    assert len(cover) <= 5 + 3 + 3 < len(cells)  # at most one per pair, seed and sparsity
    assert {(c.method, c.ablation) for c in cover} == {(c.method, c.ablation) for c in cells}
    assert {c.seed for c in cover} == {0, 1, 2}
    assert {c.sparsity for c in cover if c.method != "dense"} == {0.9, 0.98, 0.99}


# --------------------------------------------------------------------------
# Diverged cells: finished, reported as diverged, in no mean.


def test_run_status_done_diverged_or_unfinished():
    done = results_json("grasp", 0.9, 0, 0.5)
    assert sweep.is_complete(done)  # no status: a results.json from before statuses
    assert sweep.is_complete(dict(done, status="done"))
    diverged = diverged_json("grasp", 0.9, 0, 57)
    assert sweep.is_diverged(diverged) and not sweep.is_complete(diverged)
    assert not sweep.is_diverged(dict(diverged, preempted=True))
    assert not sweep.is_complete(dict(done, status="running"))


def test_aggregate_leaves_diverged_cells_out_of_every_mean():
    results = [
        results_json("grasp", 0.9, 0, 0.50, flow=(1.0, 4.0)),
        results_json("grasp", 0.9, 1, 0.70, flow=(3.0, 8.0)),
        diverged_json("grasp", 0.9, 2, 57, steps=57),
        diverged_json("random", 0.99, 1, 12),
        diverged_json("random", 0.99, 0, 30),
    ]
    grasp, random_ = sweep.aggregate(results)
    assert grasp["seeds"] == [0, 1] and grasp["diverged"] == [(2, "57")]
    assert grasp["steps"] == "2"  # the done seeds' steps
    assert grasp["final_test_accuracy_mean"] == pytest.approx(0.6)
    assert grasp["final_test_accuracy_std"] == pytest.approx(0.2 / 2 ** 0.5)
    assert grasp["grad_norm_sq_after_mean"] == pytest.approx(2.0)
    assert random_["seeds"] == [] and random_["diverged"] == [(0, "30"), (1, "12")]
    assert random_["final_test_accuracy_mean"] is None and random_["steps"] == ""

    md = sweep.to_markdown([grasp, random_])
    assert "| digits | mlp | grasp | none | 90.00% | 2 | 2 | 60.00 ± 14.14 | 60.00 ± 14.14 | " \
           "2 ± 1.41 | 6 ± 2.83 | 1 |" in md
    assert "| digits | mlp | random | none | 99.00% | 0 | – | – | – | – | – | 2 |" in md
    assert "- grasp mlp/digits sparsity 90.00% seed 2: diverged at step 57" in md
    assert "- random mlp/digits sparsity 99.00% seed 1: diverged at step 12" in md
    table = list(csv.DictReader(io.StringIO(sweep.to_csv([grasp, random_]))))
    assert (table[0]["n_seeds"], table[0]["n_diverged"], table[0]["diverged_seeds"],
            table[0]["diverged_at_steps"]) == ("2", "1", "2", "57")
    assert table[1]["final_test_accuracy_mean"] == "" and table[1]["n_diverged"] == "2"
    assert table[1]["diverged_seeds"] == "0 1" and table[1]["diverged_at_steps"] == "30 12"


def _diverged_sweep(root):
    """Two done cells and two diverged ones (one whose results.json names no method, seed or
    sparsity: those come from its config.json)."""
    for seed in (0, 1):
        fake_cell(root, f"grasp_s0.9_seed{seed}", results_json("grasp", 0.9, seed, 0.5 + seed / 10))
    fake_cell(root, "grasp_s0.9_seed2", diverged_json("grasp", 0.9, 2, 57), masks=False)
    d = root / "snip_s0.9_seed0"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(
        {"method": "snip", "seed": 0, "sparsity": 0.9, "dataset": "digits", "arch": "mlp"}))
    (d / "results.json").write_text(json.dumps({"status": "diverged", "diverged_at_step": 3}))


def test_report_shows_diverged_cells_as_finished_and_diverged(tmp_path):
    _diverged_sweep(tmp_path)
    assert sweep.cell_finished(str(tmp_path / "grasp_s0.9_seed2"), 10 ** 6)  # never rerun
    assert sweep.main(["--sweep_dir", str(tmp_path), "--report_only"]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "| digits | mlp | grasp | none | 90.00% | 2 | 2 | 55.00 ± 7.07 |" in md
    assert "| digits | mlp | snip | none | 90.00% | 0 | – | – | – | – | – | 1 |" in md
    assert "seed 2: diverged at step 57" in md and "snip mlp/digits sparsity 90.00% seed 0: " \
                                                   "diverged at step 3" in md
    assert "Not finished" not in md
    table = {r["method"]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert table["grasp"]["n_diverged"] == "1" and table["snip"]["n_seeds"] == "0"
    assert float(table["grasp"]["final_test_accuracy_mean"]) == pytest.approx(0.55)


def test_run_grid_skips_diverged_cells_and_names_them(tmp_path, capsys):
    _diverged_sweep(tmp_path)
    cells = sweep.make_grid(["grasp"], [0.9], [0, 1, 2], ["none"])
    assert sweep.run_grid(cells, [], str(tmp_path), 2, echo=False) == 0  # nothing to run
    out = capsys.readouterr().out
    assert "3 cell(s), 3 finished, 0 to run" in out
    assert "cell 3/3: grasp s=0.9 seed=2: diverged at step 57, skipped" in out
    assert out.count("finished, skipped") == 2


def test_outcome_of_a_cell_that_diverged(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(diverged_json("grasp", 0.9, 0, 57)))
    kind, line = runner.cell_outcome(str(tmp_path), 1, 65.0, 100, runner.StopSignals())
    assert kind == "diverged" and line.startswith("DIVERGED at step 57")
    assert "accuracy" not in line and "0:01:05" in line
    (tmp_path / "results.json").write_text(json.dumps(results_json("grasp", 0.9, 0, 0.5)))
    assert runner.cell_outcome(str(tmp_path), 0, 1.0, 2, runner.StopSignals())[0] == "done"
    assert runner.cell_outcome(str(tmp_path), 1, 1.0, 2, runner.StopSignals())[0] == "failed"


# --------------------------------------------------------------------------
# The report path stays light; its method order is the registry's.


def test_method_order_agrees_with_the_registry():
    from experiments.sweep.validate import registry_names

    names, _ = registry_names()
    assert [m for m in names if m in aggregation.METHOD_ORDER] == list(aggregation.METHOD_ORDER)
    assert sorted(names, key=aggregation.method_rank)[-1] == "dense"


def test_report_only_loads_no_jax(tmp_path):
    for seed in (0, 1):
        fake_cell(tmp_path, f"grasp_s0.9_seed{seed}", results_json("grasp", 0.9, seed, 0.5))
    code = ("import sys; from experiments.sweep.cli import main; "
            f"status = main(['--sweep_dir', {str(tmp_path)!r}, '--report_only']); "
            "print(status, sorted({m.split('.')[0] for m in sys.modules} "
            "& {'jax', 'flax', 'optax', 'orbax', 'tensorflow', 'grasp_jax'}))")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "0 []"
    assert (tmp_path / sweep.DENSITY_PNG).exists()  # numpy and matplotlib did load
