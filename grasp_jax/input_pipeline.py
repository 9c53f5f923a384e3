"""TEMPORARY shim: the input pipeline now lives in ``grasp_jax.data``.

Kept only so that callers not yet switched keep working; import from
``grasp_jax.data`` instead. The old ``train_iterator(...)`` is
``data.train_dataset(...).as_numpy_iterator()`` (likewise ``eval_iterator``),
and ``prefetch_to_device`` moved to ``experiments/devices.py`` (device
placement belongs to the runner). Delete this module once nothing imports it.
"""

from grasp_jax.data import (  # noqa: F401  (re-exports)
    DATASETS,
    Batch,
    DatasetInfo,
    dataset_names,
    device_batch_layout,
    eval_dataset,
    first_batches,
    get_info,
    num_eval_steps,
    scoring_batch,
    scoring_stream,
    shard_batch,
    steps_per_epoch,
    train_dataset,
)
