"""One line per fault: a full disk (at start and mid-run), a lock left by a failed
start, temporary files of killed writes, the debug switch for the full traceback."""

import errno
import os
import subprocess
import time
from pathlib import Path

import chex
import pytest

from experiments import checkpointing, faults, paths
from experiments import workdir as workdirs
from tests.helpers.runs import DIGITS, run_cli


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only); skipped where mounting is impossible."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def _resize(mnt, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)


def _fill(mnt):
    with open(mnt / "fill", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def _error_lines(r):
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error")]


# --------------------------------------------------------------------------
# The lock and temporary files.


def test_a_full_disk_at_start_leaves_no_lock_and_the_rerun_takes_it(small_tmpfs):
    workdir = small_tmpfs / "w"
    workdir.mkdir()
    _fill(small_tmpfs)
    with pytest.raises(OSError) as e:
        workdirs.Lock(str(workdir)).acquire()
    assert faults.is_disk_full(e.value)
    assert sorted(os.listdir(workdir)) == []  # neither a 0-byte lock nor a temporary
    (small_tmpfs / "fill").unlink()
    lock = workdirs.Lock(str(workdir))
    lock.acquire()
    assert lock.held and lock.took_over is None
    lock.release()


def test_an_unreadable_lock_is_refused_while_young_and_taken_over_when_old(tmp_path):
    (tmp_path / workdirs.LOCK_FILE).write_bytes(b"")
    with pytest.raises(workdirs.LockHeld, match="cannot be read"):
        workdirs.Lock(str(tmp_path)).acquire()
    old = time.time() - 2 * workdirs.UNREADABLE_LOCK_STALE_S
    os.utime(tmp_path / workdirs.LOCK_FILE, (old, old))
    lock = workdirs.Lock(str(tmp_path))
    lock.acquire()
    assert lock.held and "unreadable" in lock.took_over
    lock.release()


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "results.json"

    def broken(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        paths.write_bytes_with(str(target), broken)
    assert os.listdir(tmp_path) == []


def test_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"sparse_params.npz.tmp-{dead.pid}").write_bytes(b"x")
    (tmp_path / f"results.json.tmp-{os.getpid()}").write_bytes(b"x")
    (tmp_path / "notes.tmp-x").write_bytes(b"x")
    assert paths.remove_stale_temporaries(str(tmp_path)) == [f"sparse_params.npz.tmp-{dead.pid}"]
    assert sorted(os.listdir(tmp_path)) == ["notes.tmp-x", f"results.json.tmp-{os.getpid()}"]


# --------------------------------------------------------------------------
# One line, and the traceback on demand.


def test_report_is_one_line_with_the_traceback_in_the_log_or_on_demand(tmp_path, capsys,
                                                                        monkeypatch):
    try:
        raise ValueError("inner cause")
    except ValueError as e:
        err = e
    monkeypatch.delenv(faults.DEBUG_ENV, raising=False)
    faults.report("it broke", err, str(tmp_path))
    out = capsys.readouterr().err
    assert out.count("\n") == 1 and out.startswith("error: it broke")
    assert "inner cause" in (tmp_path / faults.ERRORS_LOG).read_text()
    monkeypatch.setenv(faults.DEBUG_ENV, "1")
    faults.report("it broke", err, str(tmp_path))
    out = capsys.readouterr().err
    assert "Traceback" in out and "inner cause" in out


def test_disk_full_is_recognized_through_the_libraries_wrapping():
    wrapped = ValueError("RESOURCE_EXHAUSTED: Failed to write 50617 bytes to file 8: No space "
                         "left on device [os_error_code='28']")
    assert faults.is_disk_full(wrapped)
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as e:
        assert faults.is_disk_full(e)
    assert not faults.is_disk_full(ValueError("shape mismatch"))


def test_a_library_error_logged_once_the_disk_is_full_stays_off_the_console(
        small_tmpfs, capsys, monkeypatch):
    # What a run meets when the disk fills mid-run: the space for the errors log is
    # taken at start, checkpoints then fill the disk, and orbax logs the failed save
    # with its traceback (absl, from the main thread waiting for the save). Whether a
    # few bytes were left for the log used to depend on the timing of the writes; a
    # log that could not be written printed "--- Logging error ---" and both
    # tracebacks on the console.
    from absl import logging as absl_logging

    monkeypatch.delenv(faults.DEBUG_ENV, raising=False)
    workdir = small_tmpfs / "w"
    workdir.mkdir()
    with pytest.raises(OSError) as raised:
        with faults.library_reports_to_log(str(workdir)):
            _fill(small_tmpfs)
            try:
                raise OSError(errno.ENOSPC, "No space left on device", "checkpoints/10")
            except OSError:
                absl_logging.exception("Save Finalize thread (save_finalize) failed.")
                raise
    faults.report("no space left on the device", raised.value, str(workdir))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no space left"), err
    assert f"traceback in {workdir / faults.ERRORS_LOG}" in err
    log = (workdir / faults.ERRORS_LOG).read_text()
    assert "ERROR:absl:Save Finalize thread (save_finalize) failed." in log
    assert log.count("Traceback") == 2 and log.count("'checkpoints/10'") == 2


@pytest.mark.slow
def test_a_disk_filling_mid_run_is_one_line_and_the_rerun_resumes_bit_exactly(
        small_tmpfs, tmp_path):
    args = DIGITS + ["--method", "random", "--sparsity", "0.5", "--checkpoint_every_steps", "2",
                     "--keep_checkpoints", "50", "--log_every_steps", "2", "--max_steps", "30"]
    straight = tmp_path / "straight"
    assert run_cli(args + ["--workdir", str(straight)]).returncode == 0
    workdir = small_tmpfs / "w"
    r = run_cli(args + ["--workdir", str(workdir)])
    assert r.returncode == 1, r.stderr[-2000:]
    errors = _error_lines(r)
    assert len(errors) == 1 and "no space left" in errors[0] and str(workdir) in errors[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert len((r.stdout + r.stderr).splitlines()) < 60
    # The disk was full, and the traceback still reached the log: its space was held.
    assert f"traceback in {workdir / faults.ERRORS_LOG}" in errors[0]
    log = (workdir / faults.ERRORS_LOG).read_text()
    assert "Traceback" in log and "RESOURCE_EXHAUSTED" in log
    assert f"no space left on the device of {workdir}" in log  # the report's own section
    assert not (workdir / workdirs.LOCK_FILE).exists()
    _resize(small_tmpfs, "40m")
    r = run_cli(args + ["--workdir", str(workdir)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from step" in r.stdout
    (s1, a), (s2, b) = (checkpointing.load_state(str(d)) for d in (straight, workdir))
    assert s1 == s2 == 30
    chex.assert_trees_all_equal(a, b)


@pytest.mark.slow
def test_a_full_disk_at_start_is_one_line_and_the_workdir_stays_rerunnable(small_tmpfs):
    workdir = small_tmpfs / "w"
    workdir.mkdir()
    _fill(small_tmpfs)
    args = DIGITS + ["--method", "random", "--sparsity", "0.5", "--max_steps", "4",
                     "--workdir", str(workdir)]
    r = run_cli(args)
    assert r.returncode == 1
    errors = _error_lines(r)
    assert len(errors) == 1 and "no space left" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not Path(workdir, workdirs.LOCK_FILE).exists()
    (small_tmpfs / "fill").unlink()
    _resize(small_tmpfs, "40m")
    r = run_cli(args)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_failing_last_save_still_closes_the_metric_writer(tmp_path, capsys, monkeypatch):
    from experiments import metrics, run

    def close_then_fail(self):
        original_close(self)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "w"))

    closed = []

    def recording_close(self):
        original_writer_close(self)
        closed.append(self.path)

    original_close = checkpointing.Checkpointer.close
    original_writer_close = metrics.MetricWriter.close
    monkeypatch.setattr(checkpointing.Checkpointer, "close", close_then_fail)
    monkeypatch.setattr(metrics.MetricWriter, "close", recording_close)
    workdir = tmp_path / "w"
    assert run.main(DIGITS + ["--max_steps", "2", "--workdir", str(workdir)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "no space left" in errors[0], errors
    assert closed == [str(workdir / "metrics.jsonl")]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_an_unexpected_error_is_one_line_exit_1_with_the_traceback_in_the_log(
        tmp_path, capsys, monkeypatch):
    from experiments import run, train

    def unwritable(config, workdir, *args):
        raise PermissionError(errno.EACCES, "Permission denied",
                              os.path.join(workdir, "results.json"))

    monkeypatch.setattr(train, "train_and_evaluate", unwritable)
    monkeypatch.delenv(faults.DEBUG_ENV, raising=False)
    workdir = tmp_path / "w"
    assert run.main(DIGITS + ["--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "results.json" in errors[0] and "Traceback" not in err
    assert "Traceback" in (workdir / faults.ERRORS_LOG).read_text()
    assert not (workdir / workdirs.LOCK_FILE).exists()  # the rerun is not blocked
    monkeypatch.setenv(faults.DEBUG_ENV, "1")
    assert run.main(DIGITS + ["--workdir", str(workdir)]) == 1
    assert "Traceback" in capsys.readouterr().err
