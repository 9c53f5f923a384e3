"""ImageNet ResNet-50 matching torchvision's ``resnet50`` (25,557,032 parameters).

This is the "v1.5" ResNet: the downsampling stride sits on the bottleneck's 3x3 conv, not on
its first 1x1. Stem: 7x7/2 conv (padding 3) + BN + ReLU + 3x3/2 max-pool (padding 1). The
GraSP reference builds its ImageNet ResNet with torchvision, so this is also the paper's model.

Init follows the reference's ``weights_init`` (``models/base/init_utils.py``), which
``main_prune_imagenet.py`` applies to the torchvision network before pruning: Kaiming-normal
(fan_out) convs, BN scale 1 and bias 0, and ``fc`` drawn from N(0, 0.01) with zero bias -- not
torchvision's own ``nn.Linear`` default, which ``weights_init`` overwrites.
torchvision's ``zero_init_residual`` is off by default, here too.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from grasp_jax.models import init


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 (x4 channels), each with BN; projection shortcut when needed.

    Parameter names: ``conv1..3``, ``bn1..3``, and ``downsample_conv``/``downsample_bn``.
    """

    features: int
    strides: int = 1
    zero_init_last_bn: bool = False
    dtype: Any = jnp.float32
    conv: init.ModuleDef = init.Conv

    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        conv = functools.partial(self.conv, dtype=self.dtype)
        norm = functools.partial(init.batch_norm, train, self.dtype)
        out = self.features * self.expansion
        y = conv(self.features, (1, 1), name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv(self.features, (3, 3), strides=self.strides, padding=1, name="conv2")(y)
        y = nn.relu(norm(name="bn2")(y))
        y = conv(out, (1, 1), name="conv3")(y)
        bn3 = norm(name="bn3")
        if self.zero_init_last_bn:
            # Each residual branch then starts as zero, so every block begins as the identity.
            bn3 = bn3.clone(scale_init=nn.initializers.zeros)
        y = bn3(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out:
            shortcut = conv(out, (1, 1), strides=self.strides, name="downsample_conv")(x)
            shortcut = norm(name="downsample_bn")(shortcut)
        return nn.relu(y + shortcut)


class ResNetImageNet(nn.Module):
    """torchvision-style bottleneck ResNet for 224x224 ImageNet (NHWC inputs).

    Attributes:
      stage_sizes: bottleneck blocks per stage; (3, 4, 6, 3) is ResNet-50.
      num_classes: size of the output layer.
      zero_init_last_bn: torchvision's ``zero_init_residual`` (off by default).
      dtype: computation dtype (parameters stay float32); logits are returned in float32.
      conv: the convolution module type of every conv (default ``init.Conv``, see
        ``resnet_cifar.ResNetCifar``).

    Parameter names: ``conv1``, ``bn1``, ``layer{s}_{b}`` (s = 1..4, b from 0), ``fc``.
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    num_classes: int = 1000
    zero_init_last_bn: bool = False
    dtype: Any = jnp.float32
    conv: init.ModuleDef = init.Conv

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = self.conv(64, (7, 7), strides=2, padding=3, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(init.batch_norm(train, self.dtype, name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for s, blocks in enumerate(self.stage_sizes):
            for b in range(blocks):
                strides = 2 if (s > 0 and b == 0) else 1
                x = Bottleneck(64 * 2**s, strides, self.zero_init_last_bn, self.dtype,
                               self.conv, name=f"layer{s + 1}_{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = init.dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)
