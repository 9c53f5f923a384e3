"""Each script in examples/ runs as a user would run it and prints its sparsity report.

Each script runs as ``__main__`` with its command line in ``sys.argv``, in this process (no
interpreter start-up: jax is already imported), for few training steps; CI runs them as they
are.
"""

import contextlib
import io
import re
import runpy
import sys

import pytest

from tests.helpers.paths import REPO

EXAMPLES = REPO / "examples"


def run_example(monkeypatch, name: str, *flags: str) -> str:
    """What ``python examples/NAME --steps 3 FLAGS`` prints."""
    path = EXAMPLES / name
    monkeypatch.setattr(sys, "argv", [str(path), "--steps", "3", *flags])
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the script's folder, as python puts it first
    had_digits = "digits" in sys.modules  # examples/digits.py, which every example imports
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(path), run_name="__main__")
    finally:
        if not had_digits:
            sys.modules.pop("digits", None)
    return out.getvalue()


def reported_density(stdout: str) -> list[float]:
    """The overall density of every sparsity report printed."""
    return [float(d) / 100 for d in re.findall(r"^all prunable\s.*?([\d.]+)%$", stdout, re.M)]


@pytest.mark.parametrize("name,method", [
    pytest.param("nnx_cnn.py", "grasp", marks=pytest.mark.slow), ("dict_mlp.py", "snip")])
def test_example_prunes_trains_and_reports(monkeypatch, name, method):
    out = run_example(monkeypatch, name, "--method", method, "--sparsity", "0.8")
    assert reported_density(out) == [pytest.approx(0.2, abs=5e-3)]
    assert re.search(r"^step\s+3\s+loss [\d.]+$", out, re.M)
    assert "pruned weights still exactly 0: True" in out


@pytest.mark.slow
def test_linen_resnet_example_reports_ties_and_prunes_every_layer(monkeypatch):
    out = run_example(monkeypatch, "linen_resnet.py", "--sparsity", "0.9")
    # Zero-initialized BatchNorm scales: most scores are exactly 0, the masks
    # from them are decided by ties and empty whole layers ...
    zeros = float(re.search(r"scores exactly 0 at initialization: ([\d.]+)%", out).group(1))
    assert zeros > 50.0
    assert "TieWarning" in out and "LayerCollapseWarning" in out
    assert reported_density(out) == [pytest.approx(0.1, abs=5e-3)] * 2
    # ... while those scored with unit scales keep part of every layer.
    final = out.split("scored with BatchNorm scales at 1:")[1]
    densities = re.findall(r"^\S+/kernel\s.*?([\d.]+)%$", final, re.M)
    assert densities and all(float(d) > 0.0 for d in densities)
    assert "pruned weights still exactly 0: True" in out
