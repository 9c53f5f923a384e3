"""Checkpoints carry a digest of their content; a restore checks it and falls back
from a checkpoint whose bytes changed on disk, in one console line."""

import json
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from experiments import checkpointing
from tests.helpers.runs import DIGITS, run_cli, run_in_process


def _largest_data_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def _flip_one_bit(step_dir: Path) -> Path:
    """Flip one bit of the array bytes of the checkpoint in ``step_dir``: one whose flip
    still loads (tensorstore does not notice) but changes a value, which only the digest
    can catch. Orbax's files also hold bytes a restore never reads and structure that
    tensorstore checks itself, so positions are tried outwards from the middle of the
    largest data file until one is of that kind."""
    workdir, step = step_dir.parent.parent, int(step_dir.name)
    before = jax.tree_util.tree_leaves(checkpointing.load_state(str(workdir), step)[1])
    data = _largest_data_file(step_dir)
    raw = data.read_bytes()
    middle = len(raw) // 2
    for offset in sorted(range(len(raw)), key=lambda i: abs(i - middle))[:200]:
        flipped = bytearray(raw)
        flipped[offset] ^= 0x10
        data.write_bytes(bytes(flipped))
        try:
            after = jax.tree_util.tree_leaves(checkpointing.load_state(str(workdir), step)[1])
        except Exception:  # noqa: BLE001 - tensorstore saw it: not the flip wanted here
            continue
        if any(not np.array_equal(a, b) for a, b in zip(before, after)):
            return data
    data.write_bytes(raw)
    pytest.fail(f"no bit of the 200 bytes around the middle of {data} changes a value unseen")


def _two_checkpoints(directory, digest=True):
    ckpt = checkpointing.Checkpointer(str(directory), max_to_keep=3)
    rng = np.random.default_rng(0)
    states = {}
    for step in (10, 20):
        states[step] = {"w": rng.normal(size=(64, 64)).astype(np.float32),
                        "step": np.asarray(step, np.int32)}
        ckpt.save(step, states[step], {"best_step": step}, digest=digest)
    ckpt.close()
    return states


ABSTRACT = {"w": np.zeros((64, 64), np.float32), "step": np.asarray(0, np.int32)}


def test_the_digest_names_each_leaf_and_changes_with_one_bit():
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, bool)}
    digest = checkpointing.state_digest(state, {"x": 1})
    assert set(digest["leaves"]) == {"['a']", "['b']"}
    flipped = {**state, "a": state["a"].copy()}
    flipped["a"].view(np.uint32)[0, 1] ^= 1
    checkpointing.check_digest(digest, state, {"x": 1})
    with pytest.raises(checkpointing.DigestMismatch, match=r"\['a'\]"):
        checkpointing.check_digest(digest, flipped, {"x": 1})
    with pytest.raises(checkpointing.DigestMismatch, match="meta"):
        checkpointing.check_digest(digest, state, {"x": 2})
    # Same bytes, another shape: a different array.
    with pytest.raises(checkpointing.DigestMismatch):
        checkpointing.check_digest(digest, {**state, "a": state["a"].reshape(3, 2)}, {"x": 1})


def test_a_flipped_bit_is_detected_named_moved_aside_and_fallen_back_from(tmp_path):
    states = _two_checkpoints(tmp_path)
    _flip_one_bit(tmp_path / "checkpoints" / "20")
    lines = []
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    step, state, meta = ckpt.restore_newest(ABSTRACT, log=lines.append)
    ckpt.close()
    assert step == 10 and meta == {"best_step": 10}
    np.testing.assert_array_equal(state["w"], states[10]["w"])
    assert len(lines) == 1
    assert "checkpoint 20 cannot be restored (DigestMismatch" in lines[0] and "['w']" in lines[0]
    assert (tmp_path / checkpointing.DAMAGED_DIR / "20").is_dir()
    assert "DigestMismatch" in (tmp_path / checkpointing.ERRORS_LOG).read_text()


@pytest.mark.parametrize("error, not_damage", [
    (ConnectionResetError(104, "Connection reset by peer"), True),
    (TimeoutError("read timed out"), True),
    (ValueError("UNAVAILABLE: Error reading \"gs://b/w/checkpoints/20/state\""), True),
    (ValueError("DEADLINE_EXCEEDED: while reading"), True),
    (PermissionError(13, "Permission denied"), True),
    (checkpointing.DigestMismatch("['w'] differs"), False),
    (FileNotFoundError(2, "No such file or directory"), False),
    (ValueError("DATA_LOSS: Error reading local file: unexpected end of file"), False),
])
def test_what_a_failed_read_says_of_the_checkpoint(error, not_damage):
    assert checkpointing.says_nothing_of_the_bytes(error) is not_damage
    try:  # also when the library wraps it, as orbax does
        raise RuntimeError("restore failed") from error
    except RuntimeError as wrapped:
        assert checkpointing.says_nothing_of_the_bytes(wrapped) is not_damage


def test_a_read_that_fails_for_the_stores_reason_moves_nothing(tmp_path, monkeypatch):
    _two_checkpoints(tmp_path)
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    restore = ckpt.restore

    def store_down_for_step_20(step, *args, **kwargs):
        if step == 20:
            raise ValueError("UNAVAILABLE: upstream connect error or disconnect")
        return restore(step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "restore", store_down_for_step_20)
    lines = []
    with pytest.raises(checkpointing.CheckpointUnreadable, match="nothing was moved aside"):
        ckpt.restore_newest(ABSTRACT, log=lines.append)
    ckpt.close()
    assert lines == []  # not "trying the next older one"
    assert (tmp_path / "checkpoints" / "20").is_dir()
    assert not (tmp_path / checkpointing.DAMAGED_DIR).exists()
    assert "UNAVAILABLE" in (tmp_path / checkpointing.ERRORS_LOG).read_text()
    # Once the store answers again, the newest step restores.
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    assert ckpt.restore_newest(ABSTRACT, log=lines.append)[0] == 20
    ckpt.close()


def test_a_checkpoint_without_a_digest_still_restores(tmp_path):
    states = _two_checkpoints(tmp_path, digest=False)
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    assert not ckpt.has_digest(20)
    step, state, _ = ckpt.restore_newest(ABSTRACT, log=lambda _: None)
    ckpt.close()
    assert step == 20
    np.testing.assert_array_equal(state["w"], states[20]["w"])


def test_the_digest_is_saved_with_the_checkpoint(tmp_path):
    states = _two_checkpoints(tmp_path)
    files = [p for p in (tmp_path / "checkpoints" / "20" / checkpointing.DIGEST_ITEM).rglob("*")
             if p.is_file()]
    saved = json.loads(files[0].read_text())
    assert saved == checkpointing.state_digest(states[20], {"best_step": 20})


@pytest.mark.slow
def test_a_run_resumes_bit_exactly_past_a_flipped_bit(tmp_path):
    args = DIGITS + ["--method", "random", "--sparsity", "0.5", "--checkpoint_every_steps", "5",
                     "--log_every_steps", "5"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert run_in_process(args + ["--max_steps", "25", "--workdir", str(straight)]).returncode == 0
    assert run_in_process(args + ["--max_steps", "20", "--workdir", str(broken)]).returncode == 0
    _flip_one_bit(broken / "checkpoints" / "20")
    # The run that meets the damage in a fresh process: its console is all that process
    # prints, up to its exit.
    r = run_cli(args + ["--max_steps", "25", "--workdir", str(broken)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint 20 cannot be restored (DigestMismatch" in r.stdout
    assert "resuming from step 15" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    (s1, a), (s2, b) = (checkpointing.load_state(str(d)) for d in (straight, broken))
    assert s1 == s2 == 25
    chex.assert_trees_all_equal(a, b)


@pytest.mark.slow
def test_a_truncated_checkpoint_costs_one_console_line(tmp_path):
    args = DIGITS + ["--method", "random", "--sparsity", "0.5", "--checkpoint_every_steps", "5",
                     "--log_every_steps", "5", "--workdir", str(tmp_path / "w")]
    assert run_in_process(args + ["--max_steps", "10"]).returncode == 0
    data = _largest_data_file(tmp_path / "w" / "checkpoints" / "10")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    # A fresh process: the libraries' threads may report a failed restore on fd 2 and at exit,
    # which only that process's own console shows.
    r = run_cli(args + ["--max_steps", "15"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr and "Event loop" not in r.stderr
    assert sum("cannot be restored" in line for line in (r.stdout + r.stderr).splitlines()) == 1
