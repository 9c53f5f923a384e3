"""Fixtures shared by every test folder, the test process's compilation cache, and the order
in which xdist's workers get the tests."""

from pathlib import Path

import jax
import pytest

from experiments import jax_cache

# The runner's persistent compilation cache (its default directory), on from before this
# process compiles anything: JAX reads the setting once, at its first compilation. Runs made in
# this process then load their programs as a fresh process's would, and a rerun of the suite
# loads what the last one compiled.
jax_cache.enable()


@pytest.fixture
def x64():
    """Float64 for the test's duration, for comparisons against explicit math."""
    with jax.enable_x64(True):
        yield


# --------------------------------------------------------------------------
# Scheduling over xdist workers: the longest tests first, handed out one at a time.

# The slowest tests of a recent run, as ``pytest --durations`` prints them (seconds, phase,
# test id). Only the order matters, and only roughly: a stale or missing entry costs wall
# time, never a result.
DURATIONS_FILE = Path(__file__).with_name("slowest_durations.txt")


def recorded_durations(path: Path = DURATIONS_FILE) -> dict[str, float]:
    """Test id -> seconds of its ``call`` phase, from the lines of ``--durations`` output."""
    durations: dict[str, float] = {}
    if not path.exists():
        return durations
    for line in path.read_text().splitlines():
        fields = line.split(maxsplit=2)
        if len(fields) == 3 and fields[1] == "call" and fields[0].endswith("s"):
            durations[fields[2]] = float(fields[0][:-1])
    return durations


def pytest_collection_modifyitems(config, items):
    # On xdist's workers (whose collections the scheduler hands out in this order): longest
    # first, the rest in collection order (Python's sort is stable). With each test handed
    # to a worker only as it frees up (below), no worker is left running one long test at
    # the end while the other idles. A run without workers keeps the collection order.
    if not hasattr(config, "workerinput"):
        return
    durations = recorded_durations()
    items.sort(key=lambda item: -durations.get(item.nodeid, 0.0))


def pytest_configure(config):
    # xdist's default sends each worker a quarter of its share of the tests up front, in
    # collection order, and never takes them back: the longest tests, at the front, would
    # all go to one worker. One at a time (unless the command line says otherwise), each
    # goes to whichever worker is free next.
    if config.pluginmanager.hasplugin("xdist") and config.getoption("maxschedchunk") is None:
        config.option.maxschedchunk = 1
