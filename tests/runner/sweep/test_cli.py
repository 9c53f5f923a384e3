"""experiments.sweep's command line: bad flags and unusable sweep directories exit 2,
naming the problem, with nothing written."""

import os
import runpy
import subprocess
import sys

import pytest

from experiments import sweep
from experiments.sweep.sweep_dir import sweep_dir_problem
from tests.helpers.sweep_cells import fake_cell, results_json

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


def test_cli_exit_status_2(tmp_path, capsys, monkeypatch):
    # `python -m experiments.sweep`, its __main__ run as Python runs it.
    monkeypatch.setattr(sys, "argv", ["experiments.sweep", "--sweep_dir", str(tmp_path / "s"),
                                      "--sparsities", "0.99,2"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("experiments.sweep", run_name="__main__", alter_sys=True)
    assert e.value.code == 2 and "'2' is not a number in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_no_abbreviations_of_the_sweeps_flags(tmp_path, capsys):
    fake_cell(tmp_path, "random_s0.9_seed0", results_json("random", 0.9, 0, 0.5), masks=False)
    with pytest.raises(SystemExit) as e:
        sweep.main(["--sweep_dir", str(tmp_path), "--report"])  # not --report_only
    assert e.value.code == 2 and "--report" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sweep.main(["--sweep", str(tmp_path), "--report_only"])  # not --sweep_dir
    assert e.value.code == 2
    assert not (tmp_path / "results.md").exists()


@pytest.mark.parametrize("forwarded, named", [
    (["--workdir=x"], "--workdir"),
    (["--ablation", "invert"], "--ablation"),
    (["--over"], "--over"),  # no abbreviation of --overwrite: the runner refuses it
])
def test_owned_and_abbreviated_flags_are_refused(tmp_path, capsys, forwarded, named):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as e:
        sweep.main(["--sweep_dir", str(out), "--dataset", "digits", "--", *forwarded])
    assert e.value.code == 2 and named in capsys.readouterr().err
    assert not out.exists()


def _unusable_dirs(tmp_path):
    """(sweep_dir, what the message says) for each kind of unusable directory."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    cases = [("", "empty"), (str(a_file), "not a directory"),
             (str(a_file / "sweep"), "not a directory")]
    if os.geteuid() != 0:  # root writes through permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases += [(str(locked), "not writable"), (str(locked / "sweep"), "not writable")]
    return cases


def test_unusable_sweep_dir_exit_2_nothing_written(tmp_path, capsys):
    for path, named in _unusable_dirs(tmp_path):
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(SystemExit) as e:
            sweep.main(["--sweep_dir", path, "--dataset", "digits", "--arch", "mlp"])
        assert e.value.code == 2, path
        err = capsys.readouterr().err
        assert "--sweep_dir" in err and named in err, (path, err)
        assert sorted(os.listdir(tmp_path)) == before
        if path:
            with pytest.raises(SystemExit) as e:
                sweep.main(["--sweep_dir", path, "--report_only"])
            assert e.value.code == 2


def test_read_only_file_system_is_refused(tmp_path, capsys):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        assert "not writable" in sweep_dir_problem(str(mount / "sweep"))
        with pytest.raises(SystemExit) as e:
            sweep.main(["--sweep_dir", str(mount / "sweep"), "--dataset", "digits"])
        assert e.value.code == 2 and "read-only" in capsys.readouterr().err
        assert os.listdir(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_sweep_dir_that_cannot_be_created_even_by_root(tmp_path, capsys):
    # os.access lets root through; creating a directory in /proc still fails, and is
    # caught when the sweep first writes (after the runner's checks), as exit status 2.
    with pytest.raises(SystemExit) as e:
        sweep.main(["--sweep_dir", "/proc/grasp_jax_sweep", "--dataset", "digits",
                    "--arch", "mlp", "--methods", "random", "--sparsities", "0.9", "--seeds", "0"])
    assert e.value.code == 2 and "/proc/grasp_jax_sweep" in capsys.readouterr().err
    assert not os.path.exists("/proc/grasp_jax_sweep")
