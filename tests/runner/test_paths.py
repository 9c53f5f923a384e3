"""experiments.paths: the one "is this process alive" check that the workdir lock and the
clean-up of killed writes' temporaries share."""

import os
import subprocess
import sys

from experiments import paths


def _reaped_child_pid() -> int:
    """The PID of a child that has exited and been reaped: no process has it now (until the
    kernel hands the number out again, after a full turn of the PID space)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_our_own_process_and_init_are_alive_and_a_finished_child_is_not():
    assert paths.process_alive(os.getpid())
    assert paths.process_alive(1)  # init: alive, whether or not it is ours to signal
    assert not paths.process_alive(_reaped_child_pid())


def test_a_temporary_of_a_finished_writer_is_removed_and_a_live_ones_kept(tmp_path):
    dead = _reaped_child_pid()
    (tmp_path / f"results.json.tmp-{dead}").write_text("{")
    (tmp_path / f"metrics.jsonl.tmp-{os.getpid()}").write_text("{")
    assert paths.remove_stale_temporaries(str(tmp_path)) == [f"results.json.tmp-{dead}"]
    assert sorted(os.listdir(tmp_path)) == [f"metrics.jsonl.tmp-{os.getpid()}"]
