"""Tests of experiments.devices: batches onto the local devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from experiments.devices import prefetch_to_device
from tests.helpers.data import digits_train, take
from tests.helpers.paths import REPO


def test_prefetch_to_device_single_device():
    batches = take(digits_train(local_device_count=jax.local_device_count()), 3)
    on_device = list(prefetch_to_device(iter(batches), size=2))
    assert len(on_device) == 3
    assert isinstance(on_device[0]["image"], jax.Array)
    np.testing.assert_array_equal(np.asarray(on_device[2]["label"]), batches[2]["label"])
    with pytest.raises(ValueError, match="number of devices"):
        next(prefetch_to_device(iter([{"x": np.zeros((jax.local_device_count() + 1, 2))}])))


@pytest.mark.slow  # a fresh interpreter importing jax and tensorflow
def test_four_fake_devices_in_a_subprocess():
    script = textwrap.dedent("""
        import jax, numpy as np
        from grasp_jax import data
        from experiments.devices import prefetch_to_device
        assert jax.local_device_count() == 4
        stream = data.train_dataset("digits", global_batch_size=32, seed=0)
        batches = prefetch_to_device(stream.as_numpy_iterator())
        batch = next(batches)
        assert batch["image"].shape == (4, 8, 8, 8, 1), batch["image"].shape
        assert len(batch["image"].sharding.device_set) == 4
        sums = jax.pmap(lambda x: x.sum())(batch["label"])
        assert sums.shape == (4,)
        print("ok")
        """)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
