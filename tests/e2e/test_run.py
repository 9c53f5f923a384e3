"""The experiment runner end to end: CLI validation, outputs, kill/resume, 1 vs 4 devices.

Whole runs call the runner's main in this process (a stop signal too), except where a kill
or four fake devices need a fresh one; flag checks run in-process too. Runs use
scikit-learn's digits (no download) except the one test that needs the real CIFAR-10 copy in
../shared/tfds.
"""

import json
import os
import signal

import chex
import numpy as np
import pytest

from experiments import checkpointing, config_schema, run, run_config
from experiments import workdir as workdirs
from tests.helpers.paths import SHARED_TFDS as TFDS_DIR
from tests.helpers.runs import (
    DIGITS,
    assert_refused,
    read_metrics,
    run_cli,
    run_in_process,
    saved_run,
)

# --------------------------------------------------------------------------
# Whole runs.


@pytest.mark.slow
@pytest.mark.skipif(not TFDS_DIR.is_dir(), reason="needs the CIFAR-10 copy in ../shared/tfds")
def test_cifar10_end_to_end_writes_every_output(tmp_path):
    workdir = tmp_path / "cifar"
    r = run_in_process(["--dataset", "cifar10", "--arch", "small_vgg", "--method", "grasp",
              "--sparsity", "0.95", "--batch_size", "64", "--max_steps", "24",
              "--log_every_steps", "8", "--data_dir", str(TFDS_DIR), "--workdir", str(workdir)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "scoring with grasp on 100 training images in 2 chunks" in r.stdout
    names = {p.name for p in workdir.iterdir()}
    assert {"config.json", "checkpoints", "metrics.jsonl", "tensorboard", "sparsity.md",
            "density.png", "masks.npz", "results.json"} <= names
    assert not any(".tmp-" in n for n in names)

    results = json.loads((workdir / "results.json").read_text())
    masks = np.load(workdir / "masks.npz")
    # Layers in network order (the param tree's sorted keys would put the classifier first).
    assert masks.files == ["conv0/kernel", "conv1/kernel", "conv2/kernel", "classifier/kernel"]
    total = sum(m.size for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    # Exactly round(0.95 * total) weights pruned, and exactly those are zero after training.
    assert total - kept == int(np.floor(0.95 * total + 0.5))
    assert results["kept_weights"] == kept and results["prunable_weights"] == total
    assert results["prunable_zero_fraction"] == pytest.approx(1 - kept / total, abs=1e-12)
    assert results["steps"] == 24 and results["preempted"] is False
    assert 0.0 <= results["final_test_accuracy"] <= 1.0
    assert results["best_test_accuracy"] >= results["final_test_accuracy"]
    assert results["train_images_per_sec"] > 0 and results["wall_time_s"] > 0

    saved = json.loads((workdir / "config.json").read_text())
    assert config_schema.Config.from_dict(saved).sparsity == 0.95
    assert (workdir / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| **all prunable** |" in (workdir / "sparsity.md").read_text()
    metrics = read_metrics(workdir)
    assert [m["step"] for m in metrics if "train/loss" in m] == [8, 16, 24]
    assert metrics[-1]["step"] == 24 and "test/accuracy" in metrics[-1]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    step, state = checkpointing.load_state(str(workdir))
    assert step == 24 and int(state["step"]) == 24 and "batch_stats" in state


def test_a_one_step_run_reports_no_throughput_rather_than_nan(tmp_path):
    # The first step compiles and is not training time, so one step times no images.
    r = run_in_process(DIGITS + ["--max_steps", "1", "--log_every_steps", "1",
                       "--workdir", str(tmp_path / "one")])
    assert r.returncode == 0, r.stdout + r.stderr
    done = [line for line in r.stdout.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and done[0].endswith("n/a train img/s"), r.stdout
    assert "nan" not in r.stdout.lower(), r.stdout
    assert json.loads((tmp_path / "one" / "results.json").read_text())[
        "train_images_per_sec"] is None


@pytest.fixture
def dataset_info_calls(monkeypatch):
    """The config of every call of ``config_schema.dataset_info`` from now on, through any
    runner module that holds the function."""
    import sys

    real, calls = config_schema.dataset_info, []

    def counted(config):
        calls.append(config)
        return real(config)

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "experiments" and getattr(module, "dataset_info", None) is real:
            monkeypatch.setattr(module, "dataset_info", counted)
    return calls


@pytest.mark.parametrize("scoring", [
    ["--method", "grasp"],  # in memory, on the re-drawn copy, with the gradient-flow report
    ["--method", "snip", "--score_batches", "2", "--score_batch_size", "16"],  # streamed
])
def test_one_run_computes_its_dataset_info_once(tmp_path, dataset_info_calls, scoring):
    r = run_in_process(DIGITS + scoring + ["--max_steps", "1", "--workdir", str(tmp_path / "w")])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "scoring with" in r.stdout and "gradient flow after pruning" in r.stdout
    assert len(dataset_info_calls) == 1, [c.dataset for c in dataset_info_calls]


def test_a_damaged_record_is_named_from_the_runs_own_dataset_info(tmp_path, monkeypatch,
                                                                   dataset_info_calls):
    import tensorflow as tf

    from grasp_jax.data import integrity

    from experiments import train

    def damaged(config, workdir, info, *args):
        raise tf.errors.DataLossError(None, None, "corrupted record at 12")

    named = []  # digits has no record files to name: what the message is made from is enough
    monkeypatch.setattr(train, "train_and_evaluate", damaged)
    monkeypatch.setattr(integrity, "damaged_record_message",
                        lambda e, info, data_dir: named.append(info) or f"{info.name}: damaged")
    r = run_in_process(DIGITS + ["--workdir", str(tmp_path / "w")])
    assert r.returncode == 1 and "error: digits: damaged" in r.stderr, r.stderr
    assert [info.name for info in named] == ["digits"] and len(dataset_info_calls) == 1


@pytest.mark.slow
def test_killed_and_preempted_run_resumes_to_the_same_parameters(tmp_path):
    """SIGKILL mid-epoch, then SIGTERM, then finish == one uninterrupted run, bit for bit."""
    # small_vgg has BatchNorm, so running statistics must survive the restarts too.
    args = ["--dataset", "digits", "--arch", "small_vgg", "--batch_size", "32", "--method",
            "random", "--sparsity", "0.5", "--max_steps", "60", "--checkpoint_every_steps", "10",
            "--log_every_steps", "5"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    r = run_in_process(args + ["--workdir", str(straight)])
    assert r.returncode == 0, r.stderr

    r = run_cli(args + ["--workdir", str(broken)], signal_at=(15, signal.SIGKILL))
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert checkpointing.load_state(str(broken))[0] == 10
    r = run_in_process(args + ["--workdir", str(broken)], signal_at=(27, signal.SIGTERM))
    assert r.returncode == 143, r.stderr
    assert "resuming from step 10" in r.stdout
    assert "SIGTERM: saved a checkpoint at step 27" in r.stdout
    assert not (broken / "results.json").exists()
    r = run_in_process(args + ["--workdir", str(broken)])  # crosses the epoch boundary at 44
    assert r.returncode == 0, r.stderr
    assert "resuming from step 27" in r.stdout

    (s1, a), (s2, b) = (checkpointing.load_state(str(d)) for d in (straight, broken))
    assert s1 == s2 == 60
    chex.assert_trees_all_equal(a, b)
    # The resumed run's log holds no step twice (lines written after the last
    # checkpoint by the killed run were dropped) and its evaluations match.
    ma, mb = read_metrics(straight), read_metrics(broken)
    train_steps = [m["step"] for m in mb if "train/loss" in m]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 60
    evals = [[(m["step"], m["test/accuracy"], m["test/loss"]) for m in ms if "test/loss" in m]
             for ms in (ma, mb)]
    assert evals[0] == evals[1] and [e[0] for e in evals[0]] == [44, 60]
    ra = json.loads((straight / "results.json").read_text())
    rb = json.loads((broken / "results.json").read_text())
    for key in ("final_test_accuracy", "best_test_accuracy", "best_step", "sparsity_reached"):
        assert ra[key] == rb[key], key


@pytest.mark.slow
def test_one_and_four_devices_give_the_same_loss_curve(tmp_path):
    args = DIGITS + ["--method", "random", "--sparsity", "0.5", "--max_steps", "12",
                     "--log_every_steps", "1"]
    one = run_in_process(args + ["--workdir", str(tmp_path / "one")])
    four = run_cli(args + ["--workdir", str(tmp_path / "four")], devices=4)
    assert one.returncode == 0, one.stderr
    assert four.returncode == 0, four.stderr
    losses = [[m["train/loss"] for m in read_metrics(tmp_path / d) if "train/loss" in m]
              for d in ("one", "four")]
    assert len(losses[0]) == 12
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    res = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "four")]
    assert (res[0]["devices"], res[1]["devices"]) == (1, 4)
    assert res[0]["final_test_accuracy"] == pytest.approx(res[1]["final_test_accuracy"], abs=1e-3)


# --------------------------------------------------------------------------
# Flags and workdirs: every refusal is exit status 2, names the bad value, writes nothing.


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--arch", "resnet7"], ["--arch", "'resnet7'"]),
        (["--dataset", "mnist"], ["--dataset", "'mnist'"]),
        (["--method", "prune_all"], ["--method", "'prune_all'"]),
        (["--sparsity", "1.0"], ["--sparsity", "'1.0'", "[0, 1)"]),
        (["--sparsity", "-0.1"], ["--sparsity", "'-0.1'"]),
        (["--epochs", "-3"], ["--epochs", "'-3'"]),
        (["--batch_size", "0"], ["--batch_size", "'0'"]),
        (["--lr", "nan"], ["--lr", "'nan'"]),
        (["--bogus_flag", "1"], ["unrecognized arguments: --bogus_flag"]),
        (["--method", "dense", "--sparsity", "0.5"], ["dense", "0.5"]),
        (["--dataset", "digits", "--arch", "vgg19"],
         ["--arch vgg19", "digits", "shrink to nothing"]),
        (["--dataset", "cifar10", "--arch", "small_vgg", "--data_dir", "/nonexistent/tfds"],
         ["cifar10 is not prepared", "/nonexistent/tfds"]),
    ],
)
def test_bad_flags_fail_at_parse_time(capsys, tmp_path, argv, needles):
    workdir = tmp_path / "w"
    assert_refused(capsys, argv + ["--workdir", str(workdir)], *needles)
    assert not workdir.exists()


def test_batch_size_must_divide_over_the_devices(capsys, tmp_path, monkeypatch):
    import jax

    monkeypatch.setattr(jax, "local_device_count", lambda *a, **k: 4)
    workdir = tmp_path / "w"
    assert_refused(capsys, DIGITS[:4] + ["--batch_size", "30", "--workdir", str(workdir)],
             "--batch_size 30", "device count 4")
    assert not workdir.exists()


def test_conflicting_workdir_is_refused_and_left_alone(capsys, tmp_path):
    workdir = tmp_path / "w"
    saved_run(workdir, sparsity=0.9)
    (workdir / "checkpoints").mkdir()
    before = {p.name: p.stat().st_mtime_ns for p in workdir.iterdir()}
    assert_refused(capsys, DIGITS + ["--sparsity", "0.5", "--workdir", str(workdir)],
             "different configuration", "sparsity: 0.9 in the workdir, 0.5 now", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in workdir.iterdir()} == before


def test_checkpoints_without_config_are_refused(capsys, tmp_path):
    workdir = tmp_path / "w"
    (workdir / "checkpoints").mkdir(parents=True)
    assert_refused(capsys, DIGITS + ["--workdir", str(workdir)], "no config.json")


def test_overwrite_replaces_the_run_but_nothing_else(tmp_path, monkeypatch):
    from experiments import train

    workdir = tmp_path / "w"
    saved_run(workdir, sparsity=0.9)
    (workdir / "checkpoints").mkdir()
    (workdir / "notes.txt").write_text("mine")
    seen = {}

    def fake_train(config, wd, *args):
        # The run's lock is held while it trains; everything else is as the run found it.
        seen["config"] = config
        seen["names"] = sorted(n for n in os.listdir(wd) if n != workdirs.LOCK_FILE)
        return {"status": "done"}

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    assert run.main(DIGITS + ["--sparsity", "0.5", "--workdir", str(workdir), "--overwrite"]) == 0
    assert seen["config"].sparsity == 0.5
    assert seen["names"] == ["config.json", "notes.txt"]
    assert json.loads((workdir / "config.json").read_text())["sparsity"] == 0.5


def test_run_control_flags_may_change_on_resume(tmp_path, monkeypatch):
    from experiments import train

    workdir = tmp_path / "w"
    saved_run(workdir, max_steps=10)
    monkeypatch.setattr(train, "train_and_evaluate", lambda c, wd, *a: {"status": "done"})
    assert run.main(DIGITS + ["--max_steps", "20", "--log_every_steps", "3",
                              "--workdir", str(workdir)]) == 0
    assert json.loads((workdir / "config.json").read_text())["max_steps"] == 20


def test_help_documents_every_flag(capsys):
    parser = run_config.build_parser()
    for action in parser._actions:
        assert action.help, action.dest
    with pytest.raises(SystemExit) as e:
        run.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--arch", "--dataset", "--method", "--sparsity", "--epochs", "--max_steps",
                 "--batch_size", "--lr", "--weight_decay", "--seed", "--workdir", "--data_dir",
                 "--overwrite"):
        assert flag in out
