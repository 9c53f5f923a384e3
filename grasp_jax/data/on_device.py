"""Normalization of uint8 batches on the device, inside the jitted steps.

The host ships training and evaluation images as uint8 pixels (a quarter of
the bytes of float32, no per-pixel host arithmetic; see ``augment``). The steps
turn them into the float32 inputs the networks were always given.

A uint8 pixel of channel c takes one of 256 values, so normalization is a
lookup in a [256, C] table computed on the host with ``augment.normalized``'s
formula and float32 rounding ((v / 255 - mean_c) / std_c, each operation
rounded). Computing the formula on the device instead would not give the same
bits: XLA rewrites a division by a broadcast divisor into a multiplication by
its rounded reciprocal, which moved about 1 value in 4 by an ulp on XLA:CPU.
The lookup gives the host's values on every backend, at the cost of a gather
from a 3 KB table (memory-bound either way).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

LEVELS = 256  # the values of a uint8 pixel


def pixel_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 [256, C]: row v holds (v / 255 - mean) / std, rounded as TF rounds it on the host."""
    levels = np.arange(LEVELS, dtype=np.float32)[:, None] / np.float32(LEVELS - 1)
    return (levels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def normalize_pixels(
    images: jax.Array,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    mask: jax.Array | None = None,
) -> jax.Array:
    """uint8 [..., H, W, C] pixels -> float32 (x / 255 - mean) / std per channel.

    Bit for bit ``augment.normalized`` (see the module doc). With ``mask``
    ([...] bool over the leading axes), images where it is False (evaluation
    padding) become exact zeros, as the host made them before.
    """
    if images.dtype != jnp.uint8:
        raise TypeError(f"images must be uint8 pixels, not {images.dtype}.")
    table = pixel_table(mean, std)
    channels = table.shape[1]
    if images.shape[-1] != channels:
        raise ValueError(f"images have {images.shape[-1]} channels; mean and std {channels}.")
    # Row-major [256, C] flattened: pixel v of channel c is entry v * C + c.
    index = images.astype(jnp.int32) * channels + jnp.arange(channels, dtype=jnp.int32)
    x = jnp.take(jnp.asarray(table.reshape(-1)), index, mode="clip")
    if mask is not None:
        x = jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), x, 0.0)
    return x
