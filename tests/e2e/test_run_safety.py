"""A run never reports garbage or loses work: divergence, stop signals,
damaged checkpoints, the workdir lock, refusals before anything is written,
layer collapse, TensorBoard on resume."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import numpy as np
import pytest

from experiments import checkpointing, run, train
from experiments import workdir as workdirs
from experiments.metrics import MetricWriter
from tests.helpers.paths import REPO
from tests.helpers.runs import (
    DIGITS,
    assert_refused,
    read_metrics,
    run_in_process,
    saved_run,
    stop_signal_handled_by_the_run,
)


def _tb_steps(workdir, tag="train/loss"):
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    steps = []
    for path in sorted(Path(workdir, "tensorboard").glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            event = event_pb2.Event.FromString(record)
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


# --------------------------------------------------------------------------
# Divergence.


@pytest.mark.slow
def test_a_diverging_run_exits_1_and_claims_no_accuracy(tmp_path):
    workdir = tmp_path / "w"
    r = run_in_process(DIGITS + ["--lr", "1e6", "--max_steps", "40", "--log_every_steps", "5",
                                 "--workdir", str(workdir)])
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["status"] == "diverged"
    assert 1 <= results["diverged_at_step"] <= 40
    assert "final_test_accuracy" not in results and "best_test_accuracy" not in results
    assert f"not finite at step {results['diverged_at_step']}" in r.stdout
    assert "done:" not in r.stdout
    # No checkpoint holds non-finite values: every saved step precedes the divergence.
    steps = [int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
    assert all(s < results["diverged_at_step"] for s in steps)


# --------------------------------------------------------------------------
# Stop signals.


@pytest.mark.slow
def test_sigint_saves_and_the_resumed_run_is_bit_exact(tmp_path):
    args = DIGITS + ["--method", "random", "--sparsity", "0.5", "--max_steps", "30",
                     "--checkpoint_every_steps", "10", "--log_every_steps", "3"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert run_in_process(args + ["--workdir", str(straight)]).returncode == 0
    r = run_in_process(args + ["--workdir", str(broken)], signal_at=(14, signal.SIGINT))
    assert r.returncode == 128 + signal.SIGINT, r.stderr[-3000:]
    assert "SIGINT: saved a checkpoint at step 14" in r.stdout
    assert "Traceback" not in r.stderr
    assert checkpointing.load_state(str(broken))[0] == 14
    assert not (broken / "results.json").exists()
    r = run_in_process(args + ["--workdir", str(broken)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from step 14" in r.stdout
    (s1, a), (s2, b) = (checkpointing.load_state(str(d)) for d in (straight, broken))
    assert s1 == s2 == 30
    chex.assert_trees_all_equal(a, b)
    # One TensorBoard event per step (the stopped run also logged its partial window at 14).
    tb = _tb_steps(broken)
    assert tb == sorted(set(tb)) and set(_tb_steps(straight)) <= set(tb)


def test_tensorboard_keeps_one_event_per_step_after_a_resume(tmp_path):
    writer = MetricWriter(str(tmp_path))
    for step in range(1, 11):
        writer.write(step, {"train/loss": float(step)})
    writer.close()  # a run killed after step 10, its last checkpoint at 6
    writer = MetricWriter(str(tmp_path))
    writer.truncate_after(6)
    for step in range(7, 13):
        writer.write(step, {"train/loss": float(step)})
    writer.close()
    assert _tb_steps(tmp_path) == list(range(1, 13))
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 13))


@pytest.mark.slow
def test_the_gradient_flow_report_survives_a_resume_in_the_checkpoint_metadata(tmp_path):
    workdir = tmp_path / "w"
    args = DIGITS + ["--method", "random", "--sparsity", "0.5", "--max_steps", "6",
                     "--checkpoint_every_steps", "3", "--workdir", str(workdir)]
    r = run_in_process(args, signal_at=(4, signal.SIGTERM))
    assert r.returncode == 143, r.stdout[-2000:] + r.stderr[-2000:]
    written = json.loads((workdir / "gradient_flow.json").read_text())
    assert {"before", "after"} <= set(written)
    step, _ = checkpointing.load_state(str(workdir))
    assert step == 4
    # The report is in the checkpoint's metadata, not read back from the file.
    (workdir / "gradient_flow.json").unlink()
    r = run_in_process(args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resuming from step 4" in r.stdout
    assert json.loads((workdir / "results.json").read_text())["gradient_flow"] == written
    assert json.loads((workdir / "gradient_flow.json").read_text()) == written  # written again


def test_checkpoints_are_saved_on_the_policy_steps_and_the_newest_kept(tmp_path):
    policy = checkpointing.save_policy((4, 0, None), (10,))
    ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=2, policy=policy)
    state = {"w": np.arange(3.0)}
    saved = []
    for step in range(1, 11):
        if ckpt.should_save(step):
            ckpt.save(step, state, {"step": step})
            saved.append(step)
    ckpt.close()
    assert saved == [4, 8, 10]
    assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == [8, 10]
    never = checkpointing.Checkpointer(str(tmp_path / "other"))  # no policy: only asked saves
    assert not any(never.should_save(step) for step in range(1, 20))
    never.close()


# --------------------------------------------------------------------------
# Damaged checkpoints.


def _damage(step_dir: Path, kind: str) -> None:
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    if kind == "truncated":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif kind == "flipped":
        raw = bytearray(data.read_bytes())
        for i in range(0, min(len(raw), 4000), 2):
            raw[i] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif kind == "no_metadata":
        (step_dir / "state" / "_METADATA").unlink()
    elif kind == "empty_meta":
        for p in (step_dir / "meta").rglob("*"):
            if p.is_file():
                p.write_bytes(b"")
    elif kind == "empty_dir":
        for p in step_dir.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _three_checkpoints(directory):
    ckpt = checkpointing.Checkpointer(str(directory), max_to_keep=3)
    rng = np.random.default_rng(0)
    states = {}
    for step in (10, 20, 30):
        states[step] = {"w": rng.normal(size=(64, 64)).astype(np.float32),
                        "step": np.asarray(step, np.int32)}
        ckpt.save(step, states[step], {"best_step": step})
    ckpt.close()
    return states


@pytest.mark.parametrize("kind", ["truncated", "flipped", "no_metadata", "empty_meta",
                                  "empty_dir"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_restored(
        tmp_path, kind):
    states = _three_checkpoints(tmp_path)
    _damage(tmp_path / "checkpoints" / "30", kind)
    lines = []
    ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3)
    abstract = {"w": np.zeros((64, 64), np.float32), "step": np.asarray(0, np.int32)}
    step, state, meta = ckpt.restore_newest(abstract, log=lines.append)
    ckpt.close()
    assert step == 20 and meta == {"best_step": 20}
    np.testing.assert_array_equal(state["w"], states[20]["w"])
    assert len(lines) == 1 and "checkpoint 30 cannot be restored" in lines[0]
    assert (tmp_path / checkpointing.DAMAGED_DIR / "30").is_dir()  # moved, not deleted
    assert not (tmp_path / "checkpoints" / "30").exists()


def test_no_restorable_checkpoint_lists_each_and_why(tmp_path):
    _three_checkpoints(tmp_path)
    for step in (10, 20, 30):
        _damage(tmp_path / "checkpoints" / str(step), "no_metadata")
    ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3)
    with pytest.raises(checkpointing.NoUsableCheckpoint) as e:
        ckpt.restore_newest({"w": np.zeros((64, 64), np.float32),
                             "step": np.asarray(0, np.int32)}, log=lambda _: None)
    ckpt.close()
    for step in (10, 20, 30):
        assert f"step {step}:" in str(e.value)


@pytest.mark.slow
def test_a_run_resumes_from_the_checkpoint_before_a_damaged_one_bit_exactly(tmp_path):
    args = DIGITS + ["--method", "random", "--sparsity", "0.5", "--checkpoint_every_steps", "5",
                     "--log_every_steps", "5"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert run_in_process(args + ["--max_steps", "25", "--workdir", str(straight)]).returncode == 0
    assert run_in_process(args + ["--max_steps", "20", "--workdir", str(broken)]).returncode == 0
    _damage(broken / "checkpoints" / "20", "truncated")
    r = run_in_process(args + ["--max_steps", "25", "--workdir", str(broken)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint 20 cannot be restored" in r.stdout and "resuming from step 15" in r.stdout
    (s1, a), (s2, b) = (checkpointing.load_state(str(d)) for d in (straight, broken))
    assert s1 == s2 == 25
    chex.assert_trees_all_equal(a, b)


# --------------------------------------------------------------------------
# One run per workdir.


def _no_training(monkeypatch):
    seen = []

    def fake(config, wd, *args):
        seen.append(sorted(os.listdir(wd)))
        return {"status": "done"}

    monkeypatch.setattr(train, "train_and_evaluate", fake)
    return seen


def test_a_locked_workdir_is_refused_and_left_alone(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "w"
    saved_run(workdir)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (workdir / workdirs.LOCK_FILE).write_text(json.dumps(
            {"pid": holder.pid, "host": socket.gethostname(), "started": "earlier"}))
        before = {p.name: p.read_bytes() for p in workdir.iterdir()}
        seen = _no_training(monkeypatch)
        assert run.main(DIGITS + ["--workdir", str(workdir)]) == 2
        err = capsys.readouterr().err
        assert f"in use by process {holder.pid}" in err and socket.gethostname() in err
        assert not seen
        assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "w"
    saved_run(workdir)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (workdir / workdirs.LOCK_FILE).write_text(json.dumps(
        {"pid": gone.pid, "host": socket.gethostname(), "started": "earlier"}))
    seen = _no_training(monkeypatch)
    assert run.main(DIGITS + ["--workdir", str(workdir)]) == 0
    assert f"took over the lock of process {gone.pid}" in capsys.readouterr().out
    assert seen and workdirs.LOCK_FILE in seen[0]  # held while training ...
    assert not (workdir / workdirs.LOCK_FILE).exists()  # ... and released after


# --------------------------------------------------------------------------
# Refused before anything is written.


@pytest.mark.parametrize("argv, needles", [
    (["--over"], ["unrecognized arguments: --over"]),
    (["--epoch", "3"], ["unrecognized arguments: --epoch"]),
    (["--seed", str(2**32)], ["--seed", str(2**32), "4294967295"]),
    (["--seed", "9223372036854775808"], ["--seed", "9223372036854775808"]),
    (["--seed", "-1"], ["--seed", "'-1'"]),
    (["--data_dir", ""], ["--data_dir", "''", "non-empty"]),
])
def test_bad_flags_are_refused_with_nothing_written(capsys, tmp_path, argv, needles):
    workdir = tmp_path / "w"
    assert_refused(capsys, DIGITS + argv + ["--workdir", str(workdir)], *needles)
    assert not workdir.exists()


def test_unusable_workdirs_are_refused(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_refused(capsys, DIGITS + ["--workdir", ""], "--workdir", "''")
    assert_refused(capsys, DIGITS + ["--workdir", str(a_file)], str(a_file), "not a directory")
    assert_refused(capsys, DIGITS + ["--workdir", str(a_file / "sub")], "cannot be created")
    assert_refused(capsys, DIGITS + ["--workdir", "/proc/grasp_jax_run"], "/proc/grasp_jax_run")
    assert sorted(os.listdir(tmp_path)) == ["file"] and a_file.read_text() == "x"


def test_a_sparsity_that_removes_every_weight_is_refused(capsys, tmp_path):
    workdir = tmp_path / "w"
    assert_refused(capsys, DIGITS + ["--sparsity", "0.9999999", "--workdir", str(workdir)],
             "--sparsity 0.9999999", "removes all 21,150 prunable weights")
    assert not workdir.exists()


def test_collapsing_masks_are_refused_naming_the_layer(capsys, tmp_path):
    # Global magnitude pruning at 90% empties LeNet-5's last layer.
    workdir = tmp_path / "w"
    argv = DIGITS + ["--method", "magnitude", "--sparsity", "0.9", "--max_steps", "1",
                     "--no-gradient_flow", "--workdir", str(workdir)]
    start = time.time()
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert "fc3/kernel" in err and "0.9" in err and "--allow_layer_collapse" in err
    assert not workdir.exists()
    assert time.time() - start < 120


def _sigint_while_pruning(monkeypatch, where: str, at: int) -> None:
    """This process sends itself SIGINT in the middle of pruning: when the scoring stream
    yields batch ``at`` of its first pass ("batch"), or at round ``at`` of iterative pruning
    ("round")."""
    import grasp_jax as gj
    from grasp_jax import data

    def sigint():
        os.kill(os.getpid(), signal.SIGINT)

    if where == "batch":
        make = data.scoring_stream

        def scoring_stream(*args, **kwargs):
            stream = make(*args, **kwargs)

            def batches():
                for i, batch in enumerate(stream(), 1):
                    if i == at:
                        sigint()
                    yield batch
            return batches
        monkeypatch.setattr(data, "scoring_stream", scoring_stream)
    else:
        prune = gj.prune

        def pruned(*args, callback, **kwargs):
            def each_round(r, s, masks):
                if r == at:
                    sigint()
                callback(r, s, masks)
            return prune(*args, callback=each_round, **kwargs)
        monkeypatch.setattr(gj, "prune", pruned)


@pytest.mark.slow
@pytest.mark.parametrize("where, at, flags, said", [
    # Batch 4 is read while batch 3 is summed; the check after batch 3 sees the signal.
    ("batch", 4, ["--method", "grasp", "--score_batches", "12", "--score_batch_size", "16",
                  "--score_chunk_size", "8"], "scoring pass 1/2 (g), after batch 3 of 12"),
    ("round", 4, ["--method", "synflow", "--rounds", "12"], "after round 4 of 12"),
])
def test_a_stop_signal_during_long_pruning_exits_promptly_and_the_rerun_prunes_again(
        tmp_path, monkeypatch, where, at, flags, said):
    workdir = tmp_path / "w"
    args = DIGITS + flags + ["--sparsity", "0.5", "--max_steps", "4", "--workdir", str(workdir)]
    with monkeypatch.context() as patched, stop_signal_handled_by_the_run(signal.SIGINT):
        _sigint_while_pruning(patched, where, at)
        r = run_in_process(args)
    assert r.returncode == 128 + signal.SIGINT, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"SIGINT while pruning ({said}): nothing is saved" in r.stdout
    assert "Traceback" not in r.stderr
    assert "SIGINT: stopping at the end of the current batch or round of pruning" in r.stderr
    assert "pruned with" not in r.stdout and "step 1/" not in r.stdout
    assert not (workdir / "results.json").exists()
    ckpts = workdir / "checkpoints"
    assert not ckpts.exists() or not [n for n in os.listdir(ckpts) if n.isdigit()]
    r = run_in_process(args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "resuming" not in r.stdout and "pruned with" in r.stdout
    if where == "batch":  # the passes report their progress
        assert "scoring pass 1/2 (g): 12/12 batches" in r.stdout
        assert "scoring pass 2/2 (Hg): 12/12 batches" in r.stdout
    assert json.loads((workdir / "results.json").read_text())["status"] == "done"


def test_a_second_stop_signal_exits_at_once():
    script = ("import os, signal, time\n"
              "from experiments.signals import StopSignals\n"
              "with StopSignals() as s:\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(0.2)\n"
              "    assert s.signum == signal.SIGINT\n"
              "    print('first handled', flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(30)\n")
    start = time.time()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 128 + signal.SIGINT and time.time() - start < 20
    assert "first handled" in r.stdout
    assert "SIGINT again: exiting now" in r.stderr
