"""Data-parallel scoring: devices score whole chunks, g and Hg are summed across devices.

The pmap checks run in a subprocess with 4 fake CPU devices (the device count
is fixed when JAX starts), in float64, against the single-device host loop.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from experiments import data_scoring
from tests.helpers.paths import REPO


def test_deal_chunks_gives_each_device_whole_chunks_and_pads_with_weight_zero():
    # 3 chunks of 2 on 2 devices: device 0 gets chunks 0 and 1, device 1 chunk 2 and a padding copy.
    batch = {"image": np.arange(6, dtype=np.float32)[:, None] * 10,
             "label": np.arange(6, dtype=np.int32)}
    dealt = data_scoring.deal_chunks(batch, num_chunks=3, num_devices=2)
    np.testing.assert_array_equal(dealt["label"], [[0, 1, 2, 3], [4, 5, 0, 1]])
    np.testing.assert_array_equal(dealt["image"][..., 0], dealt["label"] * 10)
    np.testing.assert_array_equal(dealt["weight"], [[1, 1, 1, 1], [1, 1, 0, 0]])
    # More devices than chunks (the paper's two halves on 4 devices): two devices only pad.
    dealt = data_scoring.deal_chunks(batch, num_chunks=2, num_devices=4)
    np.testing.assert_array_equal(dealt["label"], [[0, 1, 2], [3, 4, 5], [0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(dealt["weight"].sum(axis=1), [3, 3, 0, 0])
    with pytest.raises(ValueError, match="5 scoring images do not split into 2"):
        data_scoring.deal_chunks({k: v[:5] for k, v in batch.items()}, num_chunks=2, num_devices=2)


_FOUR_DEVICES = """
import chex, jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
import grasp_jax as gj
from experiments import data_scoring
from tests.helpers.tiny_models import convbn_setup

assert jax.device_count() == 4
params, loss, batch = convbn_setup(jnp.float64, n=12)
batch = {"image": np.asarray(batch["x"]), "label": np.asarray(batch["y"])}

def plain(p, b):
    return loss(p, {"x": b["image"], "y": b["label"]})

def weighted(p, b):  # what data_scoring.make_loss_fn does with a 'weight' entry
    return plain(p, b) * jnp.mean(b["weight"])

for num_chunks in (6, 3, 2):  # 2 and 1 chunks per device, and devices with only padding
    for scorer in (gj.grasp_scores, gj.snip_scores):
        want = scorer(params, plain, batch, num_microbatches=num_chunks)
        dealt = data_scoring.deal_chunks(batch, num_chunks, 4)
        per_device = -(-num_chunks // 4)
        score = lambda p, b: scorer(p, weighted, b, num_microbatches=per_device, axis_name="d")
        got = jax.pmap(score, axis_name="d", in_axes=(None, 0))(params, dealt)
        on_device = [jax.tree_util.tree_map(lambda g, d=d: g[d], got) for d in range(4)]
        chex.assert_trees_all_equal(*on_device)  # every device holds the same sums
        chex.assert_trees_all_close(on_device[0], want, rtol=1e-10, atol=1e-14)
        assert np.abs(np.asarray(jax.tree_util.tree_leaves(want)[-1])).max() > 0
        # The runner's helper: the same scores, read back from this process's first device.
        criterion = gj.criteria.CRITERIA[scorer.__name__.removesuffix("_scores")]
        fn = data_scoring.data_parallel_scorer(criterion, weighted, batch, num_chunks)
        chex.assert_trees_all_close(fn(params), want, rtol=1e-10, atol=1e-14)
# Ragged chunks under pmap: 3 examples per device in chunks of 2 + 1, against the
# same chunks streamed on one device (4 batches of 3, microbatch_size=2).
stream = lambda: iter([{k: v[3 * d:3 * d + 3] for k, v in batch.items()} for d in range(4)])
_, hg = gj.streaming.gradient_and_hvp_from_batches(params, plain, stream, microbatch_size=2)
want = gj.scoring.grasp_from_hvp(params, hg)
per_device = {k: v.reshape((4, 3) + v.shape[1:]) for k, v in batch.items()}
got = jax.pmap(lambda p, b: gj.grasp_scores(p, plain, b, microbatch_size=2, axis_name="d"),
               axis_name="d", in_axes=(None, 0))(params, per_device)
chex.assert_trees_all_close(jax.tree_util.tree_map(lambda g: g[3], got), want,
                            rtol=1e-10, atol=1e-14)
print("ok")
"""


@pytest.mark.slow
def test_pmap_scores_over_four_devices_equal_the_single_device_scores():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_FOUR_DEVICES)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]

