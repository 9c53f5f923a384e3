import os
import sys

import pytest

# Test modules import shared helpers from one another (e.g. tiny models in test_scoring).
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _fresh_in_memory_splits():
    """Each test decodes its own splits: under ``tfds.testing.mock_data`` two tests share a
    (dataset, split) key but not the examples."""
    yield
    from grasp_jax.data import in_memory

    in_memory.clear()
