"""VGG networks: the GraSP paper's CIFAR/Tiny-ImageNet form and torchvision's ImageNet form.

``VGG`` follows the GraSP reference ``models/base/vgg.py``: 3x3 convolutions without bias, each
followed by BatchNorm and ReLU, 2x2 max-pools at ``'M'``, and the usual VGG configurations with
the *last* ``'M'`` dropped, so a 32x32 input ends at 2x2 (64x64 Tiny-ImageNet at 4x4). The
reference then average-pools with a window of 2 (CIFAR) or 4 (Tiny-ImageNet) -- in both cases
the whole final feature map -- and applies a single linear classifier.

``VGGImageNet`` follows torchvision's ``vgg16`` / ``vgg16_bn``: convolutions with bias, all five
max-pools, adaptive average pooling to 7x7 and a 4096-4096 classifier with dropout 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from grasp_jax.models import init

Cfg = Sequence[int | str]

# The last 'M' of the classic configurations is omitted, as in the GraSP reference.
CIFAR_CFGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512),
}

# torchvision's configuration "D" (VGG-16), with all five pools.
IMAGENET_CFG16: tuple[int | str, ...] = CIFAR_CFGS[16] + ("M",)


def _max_pool(x: jnp.ndarray) -> jnp.ndarray:
    return nn.max_pool(x, (2, 2), strides=(2, 2))


def conv_stack(x: jnp.ndarray, cfg: Cfg, conv: init.ModuleDef, *, train: bool, dtype: Any,
               use_bias: bool, batch_norm: bool) -> jnp.ndarray:
    """Both VGGs' features: 3x3 convs (``conv{i}``), optional BatchNorm (``bn{i}``) and
    ReLU, 2x2 max-pools at ``'M'``. Called inside a compact ``__call__``, whose module owns
    the layers."""
    i = 0
    for v in cfg:
        if v == "M":
            x = _max_pool(x)
            continue
        x = conv(v, (3, 3), padding=1, use_bias=use_bias, dtype=dtype, name=f"conv{i}")(x)
        if batch_norm:
            x = init.batch_norm(train, dtype, name=f"bn{i}")(x)
        x = nn.relu(x)
        i += 1
    return x


class VGG(nn.Module):
    """GraSP-reference VGG for CIFAR-10/100 and Tiny-ImageNet (NHWC inputs).

    Attributes:
      cfg: channel counts, with ``'M'`` for a 2x2 max-pool.
      num_classes: size of the output layer.
      dtype: computation dtype (parameters stay float32); logits are returned in float32.
      conv: the convolution module type of every conv (default ``init.Conv``: the reference
        init and the fast CPU convolution in auto mode; ``init.NativeConv`` for XLA's own).

    Parameter names: ``conv{i}``/``bn{i}`` for the i-th conv layer, ``classifier``.
    """

    cfg: Cfg
    num_classes: int = 10
    dtype: Any = jnp.float32
    conv: init.ModuleDef = init.Conv

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = conv_stack(x, self.cfg, self.conv, train=train, dtype=self.dtype, use_bias=False,
                       batch_norm=True)
        # The reference's AvgPool2d(2) on CIFAR (4 on Tiny-ImageNet) spans the whole final map,
        # i.e. it is a global mean; taking the mean keeps that true for any input size.
        x = jnp.mean(x, axis=(1, 2))
        x = init.dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        return x.astype(jnp.float32)


def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Averaging weights of PyTorch's AdaptiveAvgPool along one axis: bin i covers
    ``[floor(i*n_in/n_out), ceil((i+1)*n_in/n_out))``."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """``torch.nn.AdaptiveAvgPool2d(size)`` for NHWC inputs (identity when already that size)."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    ph = jnp.asarray(_adaptive_pool_matrix(h, size[0]), x.dtype)
    pw = jnp.asarray(_adaptive_pool_matrix(w, size[1]), x.dtype)
    return jnp.einsum("nhwc,ih,jw->nijc", x, ph, pw)


class VGGImageNet(nn.Module):
    """torchvision ``vgg16`` (``batch_norm=False``) or ``vgg16_bn`` for 224x224 ImageNet (NHWC).

    In train mode the classifier's two dropout layers need an rng stream named ``'dropout'``:
    ``model.apply(variables, x, train=True, rngs={'dropout': key}, mutable=[...])``.
    Flattening is in NHWC order (H, W, C), unlike torchvision's (C, H, W); it matters only when
    porting trained weights.

    Attributes:
      cfg: channel counts with ``'M'`` pools (default VGG-16).
      num_classes: size of the output layer.
      batch_norm: insert BatchNorm after each conv (torchvision's ``*_bn`` variants).
      dropout_rate: dropout probability in the classifier (0.5 in torchvision).
      hidden_widths: the classifier's hidden Linear layers, each followed by ReLU and dropout
        (torchvision's 4096, 4096; narrower ones make a VGG-16-shaped network cheap to run).
      dtype, conv: as in ``VGG``.

    Parameter names: ``conv{i}`` (and ``bn{i}``), then ``fc1``, ``fc2``, ``fc3`` (``fc{j}``
    in order, the output layer last).
    """

    cfg: Cfg = IMAGENET_CFG16
    num_classes: int = 1000
    batch_norm: bool = False
    dropout_rate: float = 0.5
    hidden_widths: Sequence[int] = (4096, 4096)
    dtype: Any = jnp.float32
    conv: init.ModuleDef = init.Conv

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        # torchvision keeps the conv bias even when BatchNorm follows.
        x = conv_stack(x, self.cfg, self.conv, train=train, dtype=self.dtype, use_bias=True,
                       batch_norm=self.batch_norm)
        x = adaptive_avg_pool(x, (7, 7))
        x = x.reshape((x.shape[0], -1))
        for j, width in enumerate(self.hidden_widths):
            x = init.dense(width, dtype=self.dtype, name=f"fc{j + 1}")(x)
            x = nn.relu(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f"dropout{j + 1}")(x)
        x = init.dense(self.num_classes, dtype=self.dtype,
                       name=f"fc{len(self.hidden_widths) + 1}")(x)
        return x.astype(jnp.float32)
