"""benchmarks.input_pipeline compares like with like: its 'before' pipeline is the training
stream as it was, the same examples and augmentation normalized on the host."""

from __future__ import annotations

import numpy as np

from grasp_jax import data

from benchmarks import input_pipeline
from tests.helpers.data import normalized, take


def test_before_and_after_are_the_same_stream():
    info = data.get_info("digits")
    common = dict(global_batch_size=32, seed=1, data_dir=None)
    before = take(input_pipeline.reference_train_dataset(info, **common).as_numpy_iterator(), 25)
    after = take(input_pipeline.current_train_dataset(info, **common).as_numpy_iterator(), 25)
    for old, new in zip(before, after, strict=True):  # 22 steps an epoch: into the second
        assert old["image"].dtype == np.float32 and new["image"].dtype == np.uint8
        np.testing.assert_array_equal(old["image"], normalized(new["image"][0], info))
        np.testing.assert_array_equal(old["label"], new["label"][0])


def test_cpu_cost_counts_the_images_it_consumed():
    batches = iter([np.zeros(1)] * 10)
    result = input_pipeline.cpu_cost(batches, batch_size=4, num_images=20, warmup=2)
    assert result["images"] == 20 and result["per_cpu_s"] > 0
    assert len(list(batches)) == 10 - 2 - 5  # warm-up, then 20 images in batches of 4
