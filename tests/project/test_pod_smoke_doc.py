"""docs/MULTIHOST.md's pod smoke test: its TPU pod command and its two-process twin on one
machine run the same runner flags, and the runner accepts both command lines.

The local twin itself is not run here: two passes of two processes take minutes on this
machine (the page quotes one run); tests/e2e/test_multihost.py runs the same mechanisms.
"""

import re
import shlex
from pathlib import Path

from experiments import run_config

PAGE = Path(__file__).resolve().parents[2] / "docs" / "MULTIHOST.md"
# Flags that say how processes join: the pod finds its layout itself, one machine names it.
LOCAL_ONLY = {"--num_cpu_devices", "--coordinator_address", "--num_processes", "--process_id"}
POD_ONLY = {"--join_cluster"}
BOOLEAN = {"--join_cluster"}


def _block(marker: str) -> str:
    page = PAGE.read_text()
    assert page.count(f"<!-- pod-smoke: {marker} -->") == 1, marker
    after = page.split(f"<!-- pod-smoke: {marker} -->", 1)[1]
    return re.search(r"```bash\n(.*?)```", after, re.S).group(1)


def _expand(text: str, **values: str) -> str:
    for name, value in values.items():
        text = text.replace(f"${name}", value)
    return text


def _flags(argv: list[str]) -> dict[str, str | None]:
    out, i = {}, 0
    while i < len(argv):
        assert argv[i].startswith("--"), argv[i:]
        if argv[i] in BOOLEAN:
            out[argv[i]], i = None, i + 1
        else:
            out[argv[i]], i = argv[i + 1], i + 2
    return out


def local_argv(tmp_path) -> list[str]:
    block = _block("local")
    shared = re.search(r'^A="(.*?)"', block, re.S | re.M).group(1)
    call = re.search(r"python -m experiments\.run \$A (.*?) --process_id 0", block).group(1)
    text = _expand(f"{shared} {call} --process_id 0", PORT="12355",
                   W=str(tmp_path / "w"), STEPS="8")
    return shlex.split(text)


def pod_argv(tmp_path) -> list[str]:
    block = _block("tpu")
    command = re.search(r'python -m experiments\.run (.*?)"', block, re.S).group(1)
    return shlex.split(_expand(command.replace("\\\n", " "), W=str(tmp_path / "w"), STEPS="8"))


def test_the_pod_and_the_local_smoke_tests_run_the_same_flags(tmp_path):
    local, pod = _flags(local_argv(tmp_path)), _flags(pod_argv(tmp_path))
    assert LOCAL_ONLY <= local.keys() and POD_ONLY <= pod.keys()
    common = {k: v for k, v in local.items() if k not in LOCAL_ONLY}
    assert {k: v for k, v in pod.items() if k not in POD_ONLY} == common
    # Long enough to checkpoint before the second pass, which then resumes from it.
    assert int(common["--checkpoint_every_steps"]) <= 4 <= int(common["--max_steps"])


def test_the_runner_accepts_both_command_lines(tmp_path):
    for argv in (local_argv(tmp_path), pod_argv(tmp_path)):
        config = run_config.parse_config(argv)
        assert (config.dataset, config.arch, config.max_steps) == ("digits", "lenet5", 8)
        assert config.checkpoint_every_steps == 4
    assert not (tmp_path / "w").exists()  # parsing writes nothing
