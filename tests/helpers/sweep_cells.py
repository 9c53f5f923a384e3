"""Finished sweep cells written by hand: what the runner leaves in a cell's workdir."""

import json

import numpy as np


def results_json(method, sparsity, seed, acc, *, best=None, steps=2, ablation=None, flow=None):
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


def diverged_json(method, sparsity, seed, step, *, steps=None):
    """A diverged run's results.json: status and step, no accuracy (experiments/train.py)."""
    r = {"arch": "mlp", "dataset": "digits", "method": method, "seed": seed,
         "sparsity_target": sparsity, "status": "diverged", "diverged_at_step": step,
         "preempted": False}
    if steps is not None:
        r["steps"] = steps
    return r


def fake_cell(root, name, results, *, masks=True):
    """A cell directory holding config.json, ``results`` as results.json and random masks."""
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"method": results["method"]}))
    (d / "results.json").write_text(json.dumps(results))
    if masks:
        keep = 1.0 - results["sparsity_target"]
        rng = np.random.default_rng(results["seed"])
        np.savez(d / "masks.npz", **{f"fc{i}/kernel": rng.random((20, 10)) < keep for i in (1, 2)},
                 **{"classifier/kernel": rng.random((10, 10)) < keep})
