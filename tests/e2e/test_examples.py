"""Each script in examples/ runs as a user would run it and prints its sparsity report.

Few training steps, so that each stays a few seconds (most of it importing jax
and compiling); CI runs them as they are.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *flags: str) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--steps", "3", *flags],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def reported_density(stdout: str) -> list[float]:
    """The overall density of every sparsity report printed."""
    return [float(d) / 100 for d in re.findall(r"^all prunable\s.*?([\d.]+)%$", stdout, re.M)]


@pytest.mark.slow  # a fresh interpreter importing jax
@pytest.mark.parametrize("name,method", [("nnx_cnn.py", "grasp"), ("dict_mlp.py", "snip")])
def test_example_prunes_trains_and_reports(name, method):
    out = run_example(name, "--method", method, "--sparsity", "0.8")
    assert reported_density(out) == [pytest.approx(0.2, abs=5e-3)]
    assert re.search(r"^step\s+3\s+loss [\d.]+$", out, re.M)
    assert "pruned weights still exactly 0: True" in out


@pytest.mark.slow  # a fresh interpreter importing jax
def test_linen_resnet_example_reports_ties_and_prunes_every_layer():
    out = run_example("linen_resnet.py", "--sparsity", "0.9")
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
