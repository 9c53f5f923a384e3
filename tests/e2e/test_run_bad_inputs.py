"""Inputs that cannot work on this host are refused in seconds, in one line, naming
the value and the limit: device counts, batch sizes, environment variables and the
compilation cache directory. Nothing is written to the workdir."""

import time

import pytest

from experiments import jax_cache, run_config
from tests.helpers.runs import DIGITS, assert_refused


def test_a_cpu_device_count_beyond_the_limit_is_refused_before_any_device_is_made(
        capsys, tmp_path):
    workdir = tmp_path / "w"
    start = time.monotonic()
    assert_refused(capsys, DIGITS + ["--num_cpu_devices", "100000", "--workdir", str(workdir)],
             "--num_cpu_devices", "'100000'", str(run_config.MAX_CPU_DEVICES))
    assert time.monotonic() - start < 30  # refused at parse time, not after setting devices up
    assert not workdir.exists()


@pytest.mark.parametrize("flags, needles", [
    (["--batch_size", "10000000"], ["--batch_size 10000000", "GiB of memory"]),
    (["--score_samples_per_class", "1000000000"],
     ["--score_samples_per_class 1000000000", "GiB of memory"]),
])
def test_batches_larger_than_host_memory_are_refused_naming_the_flag(capsys, tmp_path, flags,
                                                                     needles, monkeypatch):
    # A host of 1 GiB makes the limit independent of the machine running the test.
    monkeypatch.setattr(run_config, "host_memory_bytes", lambda: 2**30)
    workdir = tmp_path / "w"
    assert_refused(capsys, ["--dataset", "digits", "--arch", "lenet5", *flags,
                      "--workdir", str(workdir)], *needles, "1.0 GiB")
    assert not workdir.exists()


def test_a_batch_that_fits_host_memory_is_not_refused(monkeypatch):
    monkeypatch.setattr(run_config, "host_memory_bytes", lambda: 2**30)
    config = run_config.config_from_overrides(dict(dataset="digits", arch="lenet5", batch_size=32))
    run_config.check_host_memory(config)


def test_an_unknown_fast_conv_setting_is_refused_naming_the_variable(capsys, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("GRASP_JAX_FAST_CONV", "banana")
    workdir = tmp_path / "w"
    assert_refused(capsys, DIGITS + ["--workdir", str(workdir)], "GRASP_JAX_FAST_CONV='banana'",
             "auto", "native")
    err = capsys.readouterr().err
    assert "--arch" not in err
    assert not workdir.exists()


def test_a_plugin_module_that_does_not_exist_is_refused_naming_it(capsys, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("GRASP_JAX_PLUGINS", "grasp_jax_no_such_plugin")
    workdir = tmp_path / "w"
    assert_refused(capsys, DIGITS + ["--workdir", str(workdir)], "GRASP_JAX_PLUGINS",
             "'grasp_jax_no_such_plugin'")
    assert not workdir.exists()


def test_an_unusable_compilation_cache_is_refused_naming_it(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    workdir = tmp_path / "w"
    assert_refused(capsys, DIGITS + ["--compilation_cache", str(a_file), "--workdir", str(workdir)],
             str(a_file), "not a directory")
    assert_refused(capsys, DIGITS + ["--compilation_cache", str(a_file / "sub"),
                               "--workdir", str(workdir)], "cannot be created")
    assert not workdir.exists() and a_file.read_text() == "x"


def test_an_unusable_default_cache_is_one_warning_and_no_cache(tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(a_file))
    assert jax_cache.enable(None) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(a_file) in err[0] and "without a cache" in err[0], err
