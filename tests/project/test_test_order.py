"""Tests of the order in which tests/conftest.py hands tests to xdist's workers."""

from __future__ import annotations

import re
import types
from pathlib import Path

from tests import conftest
from tests.helpers.paths import REPO


def test_durations_are_read_from_call_lines_only(tmp_path):
    table = tmp_path / "durations.txt"
    table.write_text(
        "# a comment line, then lines as pytest --durations prints them\n"
        "12.50s call     tests/e2e/test_a.py::test_one\n"
        "3.00s setup    tests/e2e/test_a.py::test_one\n"
        "0.75s call     tests/core/test_b.py::test_two[one chunk at a time]\n"
        "(2 durations < 0.005s hidden.  Use -vv to show these durations.)\n")
    assert conftest.recorded_durations(table) == {
        "tests/e2e/test_a.py::test_one": 12.5,
        "tests/core/test_b.py::test_two[one chunk at a time]": 0.75,
    }
    assert conftest.recorded_durations(tmp_path / "absent.txt") == {}


def test_workers_get_the_longest_first_and_the_rest_in_collection_order(monkeypatch):
    monkeypatch.setattr(conftest, "recorded_durations",
                        lambda: {"t::slow": 30.0, "t::slower": 90.0})
    ids = ["t::a", "t::slow", "t::b", "t::slower", "t::c"]
    items = [types.SimpleNamespace(nodeid=i) for i in ids]
    worker = types.SimpleNamespace(workerinput={})
    conftest.pytest_collection_modifyitems(worker, items)
    assert [i.nodeid for i in items] == ["t::slower", "t::slow", "t::a", "t::b", "t::c"]
    items = [types.SimpleNamespace(nodeid=i) for i in ids]
    conftest.pytest_collection_modifyitems(types.SimpleNamespace(), items)  # no workers
    assert [i.nodeid for i in items] == ids


def test_every_test_in_the_committed_table_still_exists():
    recorded = conftest.recorded_durations()
    assert len(recorded) >= 20
    stale = []
    for nodeid in recorded:
        path, name = nodeid.split("::")[:2]
        name = re.sub(r"\[.*\]$", "", name)
        source = Path(REPO, path)
        if not source.exists() or f"def {name}(" not in source.read_text():
            stale.append(nodeid)
    assert not stale, f"{conftest.DURATIONS_FILE} names tests that no longer exist: {stale}"
