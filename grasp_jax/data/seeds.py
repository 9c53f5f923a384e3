"""Stateless seeds of the example streams.

Every random choice of a stream (the shuffle of an epoch, the augmentation of a
batch or example) is a pure function of a root key ``[seed, stream]`` folded
with (epoch, salt[, index]), so that any step can be regenerated without
replaying the ones before it.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

# Salts folded into the per-epoch key so that the shuffle seed and the
# augmentation seeds of one epoch are independent random streams.
SHUFFLE_SALT = 0
AUGMENT_SALT = 1
FILE_ORDER_SALT = 2
_MAX_SHUFFLE_SEED = 2**62


def fold_in(key: tf.Tensor, data: Any) -> tf.Tensor:
    """A new stateless key from ``key`` and an integer."""
    return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64))


def stream_key(seed: int, stream: int) -> tf.Tensor:
    """Root key of one stream: training uses stream = process index."""
    return tf.constant([seed, stream], dtype=tf.int64)


def shuffle_seed(key: tf.Tensor, epoch: tf.Tensor) -> tf.Tensor:
    """The tf.data shuffle seed (an int64 scalar) of epoch ``epoch``."""
    return tf.random.stateless_uniform(
        [],
        seed=fold_in(fold_in(key, epoch), SHUFFLE_SALT),
        minval=0,
        maxval=_MAX_SHUFFLE_SEED,
        dtype=tf.int64,
    )


def file_order_key(key: tf.Tensor, epoch: tf.Tensor) -> tf.Tensor:
    """The stateless key (int64 [2]) of epoch ``epoch``'s file order.

    A third salt, so the file order is independent of the example shuffle and
    the augmentation, and adding it left those (hence every stream that reads
    no files in shuffled order) unchanged.
    """
    return fold_in(fold_in(key, epoch), FILE_ORDER_SALT)


def permutation(key: tf.Tensor, n: int) -> tf.Tensor:
    """A uniformly random permutation of ``range(n)`` (int32 [n]), a pure function of ``key``.

    The argsort of n stateless uniform int64 draws (ties, with probability
    about n^2 / 2^65, are broken by position, so the order stays deterministic).
    """
    draws = tf.random.stateless_uniform([n], seed=key, minval=None, maxval=None, dtype=tf.int64)
    return tf.argsort(draws, stable=True)


def augment_seed(key: tf.Tensor, epoch: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """Seed of example ``index`` of epoch ``epoch``, or of the batch it starts.

    Derived in the (parallel) transforms rather than in the stream, which is
    produced one element at a time and would be slowed by any per-element work.
    """
    return fold_in(fold_in(fold_in(key, epoch), AUGMENT_SALT), index)
