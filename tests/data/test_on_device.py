"""Tests of grasp_jax.data.on_device and the steps' use of it: uint8 batches normalized on
the device give the host's float32 values bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from flax import jax_utils

import grasp_jax as gj
from grasp_jax import data, models
from grasp_jax.data import augment, on_device, streams


@pytest.mark.parametrize("name", data.dataset_names())
def test_the_table_is_the_hosts_normalization_of_every_level(name):
    info = data.get_info(name)
    channels = info.image_shape[-1]
    levels = tf.constant(np.repeat(np.arange(256, dtype=np.uint8)[:, None], channels, 1))
    np.testing.assert_array_equal(
        on_device.pixel_table(info.mean, info.std), augment.normalized(levels, info).numpy()
    )


def test_jitted_normalization_equals_the_host_bit_for_bit():
    # Dividing by the std on the device (XLA: times its rounded reciprocal) did not.
    info = data.get_info("imagenet2012")
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
    mask = np.array([[True, False, True], [False, True, True]])
    out = jax.jit(lambda x, m: on_device.normalize_pixels(x, info.mean, info.std, mask=m))(
        pixels, mask
    )
    expected = augment.normalized(tf.constant(pixels), info).numpy()
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out)[mask], expected[mask])
    assert not np.asarray(out)[~mask].any()  # padding: exact zeros


def test_normalization_refuses_floats_and_other_channel_counts():
    info = data.get_info("cifar10")
    with pytest.raises(TypeError, match="uint8"):
        on_device.normalize_pixels(jnp.zeros((1, 4, 4, 3)), info.mean, info.std)
    with pytest.raises(ValueError, match="channels"):
        on_device.normalize_pixels(jnp.zeros((1, 4, 4, 1), jnp.uint8), info.mean, info.std)


def test_pipelines_run_deterministically_on_a_pool_of_their_own():
    options = streams.pipeline_options()
    assert options.deterministic is True
    assert options.threading.private_threadpool_size == streams.host_cores() >= 1
    assert options.threading.max_intra_op_parallelism == 1
    assert streams.pipeline_options(3).threading.private_threadpool_size == 3
    ds = data.train_dataset(
        "digits", global_batch_size=8, seed=0, process_index=0, process_count=1,
        local_device_count=1,
    )
    assert ds.options().threading.private_threadpool_size == streams.host_cores()


def test_the_eval_step_on_uint8_batches_equals_the_host_normalized_one():
    from experiments import steps

    info = data.get_info("cifar10")
    model = models.get_model("small_vgg", 10)
    variables = steps.init_variables(model, jax.random.PRNGKey(0), (8, 8, 3))
    masks = jax.tree_util.tree_map(lambda p: np.ones(p.shape, bool), variables["params"])
    tx = gj.masked_updates(masks)
    state = jax_utils.replicate(steps.create_state(variables, masks, tx, jax.random.PRNGKey(1)))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (1, 6, 8, 8, 3), dtype=np.uint8)
    mask = np.array([[True] * 4 + [False] * 2])
    labels = rng.integers(0, 10, (1, 6)).astype(np.int32)
    host = np.where(mask[..., None, None, None],
                    augment.normalized(tf.constant(pixels), info).numpy(), 0.0)
    assert steps.input_images({"image": host}, None) is host  # floats: already normalized
    with pytest.raises(ValueError, match="pixel_stats"):
        steps.input_images({"image": pixels}, None)
    on_host = steps.make_eval_step(model)(
        state, {"image": host.astype(np.float32), "label": labels, "mask": mask})
    on_dev = steps.make_eval_step(model, (info.mean, info.std))(
        state, {"image": pixels, "label": labels, "mask": mask})
    for key in ("loss", "correct", "count"):
        np.testing.assert_array_equal(on_dev[key], on_host[key])
    assert float(on_dev["count"][0]) == 4
