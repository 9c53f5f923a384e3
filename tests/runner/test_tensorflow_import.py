"""Tests of experiments.tensorflow_import: the runner's TensorFlow starts without Keras."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.helpers.paths import REPO


def _fresh_interpreter(code: str) -> str:
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip().splitlines()[-1]


@pytest.mark.slow  # a fresh interpreter importing tensorflow
def test_the_runner_imports_tensorflow_without_keras_and_keras_still_loads_later():
    out = _fresh_interpreter("""
        import sys
        import experiments.run
        loaded = {m: m in sys.modules for m in ("tensorflow", "keras", "sklearn")}
        import keras                      # nothing left hidden afterwards
        import tensorflow as tf
        print(loaded, keras.__name__, tf.keras.layers.Dense.__name__)
    """)
    assert out == "{'tensorflow': True, 'keras': False, 'sklearn': False} keras Dense"


@pytest.mark.slow  # a fresh interpreter importing keras
def test_a_keras_loaded_before_the_runner_is_left_as_it_is():
    out = _fresh_interpreter("""
        import sys
        import keras
        before = sys.modules["keras"]
        import experiments.run
        print(sys.modules["keras"] is before)
    """)
    assert out == "True"
