"""Damaged side files of a workdir, odd workdir paths, a changed topology and a run
whose checkpoints are all damaged: each refused in one line naming the file."""

import json
import os

import pytest

from experiments import train
from experiments import workdir as workdirs
from tests.helpers.runs import DIGITS, assert_refused, run_cli, saved_run


def _listing(workdir):
    return {p: os.path.getmtime(os.path.join(workdir, p)) for p in os.listdir(workdir)}


@pytest.mark.parametrize("name, content, needle", [
    ("config.json", "[1, 2]", "not an object"),
    ("gradient_flow.json", '{"before": ', "gradient_flow.json cannot be read"),
    ("metrics.jsonl", '{"step": 1}\njunk\n{"step": 2}\n', "metrics.jsonl line 2"),
    ("metrics.jsonl", '{"step": 1}\n42\n', "metrics.jsonl line 2"),
])
def test_a_damaged_side_file_is_refused_naming_it_with_nothing_written(
        capsys, tmp_path, name, content, needle):
    workdir = tmp_path / "w"
    saved_run(workdir)
    (workdir / name).write_text(content)
    before = _listing(workdir)
    assert_refused(capsys, DIGITS + ["--workdir", str(workdir)], needle)
    assert _listing(workdir) == before


def test_a_metrics_line_cut_short_by_a_kill_is_not_a_refusal(tmp_path):
    saved_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "tr')
    assert workdirs.damaged_side_file(str(tmp_path)) is None


def test_checkpoints_that_is_a_file_is_refused(capsys, tmp_path):
    saved_run(tmp_path / "w")
    (tmp_path / "w" / "checkpoints").write_text("x")
    assert_refused(capsys, DIGITS + ["--workdir", str(tmp_path / "w")],
                   "is a file, not a directory")


def test_a_dangling_or_looping_symlink_workdir_is_refused(capsys, tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert_refused(capsys, DIGITS + ["--workdir", str(tmp_path / "dangling")], "leads nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert_refused(capsys, DIGITS + ["--workdir", str(tmp_path / "loop")], "leads nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_a_workdir_through_dotdot_creates_no_stray_folder(tmp_path, monkeypatch):
    from experiments import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "train_and_evaluate", lambda *a: {"status": "done"})
    assert run.main(DIGITS + ["--workdir", "x/../y"]) == 0
    assert (tmp_path / "y" / "config.json").exists() and not (tmp_path / "x").exists()


def test_a_workdir_whose_checkpoints_were_all_damaged_keeps_refusing(capsys, tmp_path):
    workdir = tmp_path / "w"
    saved_run(workdir)
    (workdir / "checkpoints").mkdir()
    (workdir / "checkpoints.damaged" / "10").mkdir(parents=True)
    assert_refused(capsys, DIGITS + ["--workdir", str(workdir)], "no checkpoint in",
             "--overwrite")
    assert_refused(capsys, DIGITS + ["--workdir", str(workdir)], "no checkpoint in")


def test_the_topology_check_names_both_and_honours_the_flag(capsys):
    now = train.topology()
    train.check_topology(dict(now), 5, allowed=False)
    train.check_topology({}, 5, allowed=False)  # saved before topologies were recorded
    other = {"devices": now["devices"] + 1, "processes": now["processes"]}
    with pytest.raises(train.TopologyChanged, match=f"{other['devices']} device"):
        train.check_topology(other, 5, allowed=False)
    train.check_topology(other, 5, allowed=True)
    assert "result will differ" in capsys.readouterr().out


@pytest.mark.slow
def test_resuming_on_more_devices_is_refused_with_exit_2(tmp_path):
    args = DIGITS + ["--method", "random", "--sparsity", "0.5", "--max_steps", "4",
                     "--workdir", str(tmp_path / "w")]
    assert run_cli(args).returncode == 0
    r = run_cli(args[:-4] + ["--max_steps", "6", "--num_cpu_devices", "2"] + args[-2:])
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "1 device(s)" in errors[0] and "2 device(s)" in errors[0]
    assert json.loads((tmp_path / "w" / "results.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_a_diverged_run_reports_the_step_it_went_wrong_at(tmp_path):
    workdir = tmp_path / "w"
    r = run_cli(DIGITS + ["--lr", "1e6", "--max_steps", "40", "--log_every_steps", "7",
                       "--workdir", str(workdir)])
    assert r.returncode == 1, r.stderr[-2000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == results["diverged_at_step"] <= results["detected_at_step"]
    assert results["detected_at_step"] % 7 == 0 or results["detected_at_step"] == 40
