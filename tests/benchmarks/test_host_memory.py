"""benchmarks.host_memory at a tiny size: each allocator setting reaches its own child process
(and only it: malloc variables of the calling shell are cleared), and the table has a row per
network, measurement and setting, each ratio taken against ``default``."""

import json
import re
import subprocess

import pytest

from benchmarks import host_memory

TINY = ["--archs", "small_vgg", "--rounds", "1", "--images", "8", "--batch", "8"]


@pytest.mark.slow
def test_each_setting_runs_in_its_own_process_with_only_its_tunables(monkeypatch, capsys):
    seen = []
    real = subprocess.run

    def spy(cmd, env, **kw):
        p = real(cmd, env=env, **kw)
        seen.append(json.loads(p.stdout.strip().splitlines()[-1])["malloc_env"])
        return p

    monkeypatch.setenv("MALLOC_ARENA_MAX", "3")  # a caller's own setting must not leak in
    monkeypatch.setattr(host_memory.subprocess, "run", spy)
    text = host_memory.main([*TINY, "--settings", "huge pages", "one arena, no mmap"])
    assert seen == [{}, {"GLIBC_TUNABLES": host_memory.TUNABLES["huge pages"]},
                    {"GLIBC_TUNABLES": host_memory.TUNABLES["one arena, no mmap"]}]
    rows = [line for line in text.splitlines() if line.startswith("| small_vgg, ")]
    assert [r.split(" | ")[1] for r in rows] == ["default", "huge pages",
                                                 "one arena, no mmap"] * 2
    assert all(r.split(" | ")[4] == "1.00x" for r in rows[::3])  # default against itself
    for r in rows:
        first, steady = (float(re.fullmatch(r"([0-9.]+) s", c).group(1))
                         for c in r.split(" | ")[2:4])
        assert first > 0 and steady >= 0  # a tiny steady call rounds to 0.00 s
    assert "GraSP, 8 images in two halves" in rows[0]
    assert "training gradient, batch 8" in rows[3]


def test_a_failing_child_names_its_setting(monkeypatch):
    monkeypatch.setattr(host_memory.subprocess, "run", lambda cmd, env, **kw:
                        subprocess.CompletedProcess(cmd, 3, "", "boom"))
    with pytest.raises(SystemExit, match=r"'default' child for small_vgg failed \(exit 3\)"):
        host_memory.main(TINY)
