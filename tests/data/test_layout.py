"""Tests of grasp_jax.data.layout: batches over processes and devices."""

from __future__ import annotations

import numpy as np
import pytest

from grasp_jax import data
from grasp_jax.data import layout

from tests.helpers.data import digits_train


def test_device_batch_layout():
    assert data.device_batch_layout(256, process_count=2, local_device_count=4) == (4, 32)
    with pytest.raises(
        ValueError, match=r"global_batch_size=100 .* total device count 8 \(2 processes x 4"
    ):
        data.device_batch_layout(100, process_count=2, local_device_count=4)
    with pytest.raises(ValueError, match="global_batch_size=6"):
        digits_train(global_batch_size=6, local_device_count=4)


def test_shard_batch():
    batch = {"image": np.zeros((8, 2, 2, 1)), "label": np.arange(8)}
    out = data.shard_batch(batch, 4)
    assert out["image"].shape == (4, 2, 2, 2, 1)
    np.testing.assert_array_equal(out["label"][1], [2, 3])
    with pytest.raises(ValueError, match="num_devices=3"):
        data.shard_batch(batch, 3)


def test_process_range_covers_the_split():
    # Without dropping, the first (10 % 3) processes hold one more example.
    assert [layout.process_range(10, i, 3, False) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [layout.process_range(10, i, 3, True) for i in range(3)] == [(0, 3), (3, 6), (6, 9)]
    with pytest.raises(ValueError, match=r"process_index=2 must lie in \[0, process_count=2\)"):
        layout.resolve_process(2, 2)
