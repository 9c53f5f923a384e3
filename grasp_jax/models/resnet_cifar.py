"""CIFAR ResNets of depth 6n+2 in the GraSP paper's form (reference ``models/base/resnet.py``).

Compared with He et al.'s CIFAR ResNets, the reference doubles the widths to 32/64/128 and uses a
projection shortcut (1x1 conv without bias, then BatchNorm) wherever the shape changes, instead
of zero-padding. Stem: 3x3 conv (32) + BN + ReLU; three stages of n BasicBlocks, stride 2 at the
start of stages 2 and 3; global average pooling; a linear classifier with bias.
ResNet-32 on CIFAR-10 has 1,860,522 parameters (BN scale/bias included, running stats not).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from grasp_jax.models import init

WIDTHS = (32, 64, 128)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus identity or (1x1 conv + BN) shortcut, then ReLU.

    Parameter names: ``conv1``, ``bn1``, ``conv2``, ``bn2`` and, for a projection shortcut,
    ``shortcut_conv``, ``shortcut_bn``.
    """

    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    conv: init.ModuleDef = init.Conv

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        conv = functools.partial(self.conv, self.features, dtype=self.dtype)
        norm = functools.partial(init.batch_norm, train, self.dtype)
        y = conv((3, 3), strides=self.strides, padding=1, name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv((3, 3), padding=1, name="conv2")(y)
        y = norm(name="bn2")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv((1, 1), strides=self.strides, name="shortcut_conv")(x)
            shortcut = norm(name="shortcut_bn")(shortcut)
        return nn.relu(y + shortcut)


class ResNetCifar(nn.Module):
    """GraSP-reference CIFAR ResNet (NHWC inputs, e.g. 32x32x3 or 64x64x3 Tiny-ImageNet).

    Attributes:
      depth: 6n+2 (20, 32, 44, 56, 110, ...).
      num_classes: size of the output layer.
      widths: channels of the stem and the three stages.
      dtype: computation dtype (parameters stay float32); logits are returned in float32.
      conv: the convolution module type of every conv (default ``init.Conv``: the reference
        init and the fast CPU convolution in auto mode; ``init.NativeConv`` for XLA's own).

    Parameter names: ``conv1``, ``bn1``, ``layer{s}_{b}`` (stage s = 1..3, block b from 0),
    ``fc``.
    """

    depth: int = 32
    num_classes: int = 10
    widths: tuple[int, int, int] = WIDTHS
    dtype: Any = jnp.float32
    conv: init.ModuleDef = init.Conv

    def _blocks_per_stage(self) -> int:
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got depth={self.depth}")
        return (self.depth - 2) // 6

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        n = self._blocks_per_stage()
        x = self.conv(self.widths[0], (3, 3), padding=1, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(init.batch_norm(train, self.dtype, name="bn1")(x))
        for s, width in enumerate(self.widths):
            for b in range(n):
                strides = 2 if (s > 0 and b == 0) else 1
                x = BasicBlock(width, strides, self.dtype, self.conv,
                               name=f"layer{s + 1}_{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = init.dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)
