"""Initializers and normalisation defaults shared by the model definitions.

The paper's networks were trained in PyTorch, so the initial weights (which is what
pruning-at-initialization scores) follow the authors' ``weights_init``
(``models/base/init_utils.py``) rather than Flax's defaults. The reference applies it to every
network it prunes: its CIFAR/Tiny-ImageNet VGG and ResNet call it in their constructors, and
``main_prune_imagenet.py`` applies it (``mb.model.apply(weights_init)``) to the torchvision
``resnet50`` / ``vgg16`` / ``vgg16_bn`` right before GraSP:

* convolutions: ``kaiming_normal_(mode='fan_out', nonlinearity='relu')``, an *untruncated*
  normal with variance ``2 / (out_channels * kh * kw)``, and zero bias where there is one;
* linear layers: ``N(0, 0.01)`` weights and zero bias -- also for torchvision ResNet-50's
  ``fc``, whose own default (PyTorch's uniform ``nn.Linear`` init) ``weights_init`` overwrites;
  torchvision's VGG init is the same as ``weights_init`` for every layer;
* BatchNorm: scale 1, bias 0, PyTorch's ``momentum=0.1`` (Flax keeps ``1 - 0.1`` of the old
  average, hence 0.9) and ``eps=1e-5``. One difference is kept: Flax folds the biased batch
  variance into ``var``, PyTorch the unbiased one (a factor n/(n-1)).

The small test/demo networks (``small.py``) alone differ: their hidden dense layers use He
fan-in (``dense_hidden_init``).

Flax kernels are laid out ``(kh, kw, in, out)`` for convolutions and
``(in, out)`` for dense layers, so ``variance_scaling``'s default axes already
give the same fan-in/fan-out as PyTorch's ``(out, in, kh, kw)``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from grasp_jax.models import conv as fast_conv

# Kaiming/He normal, fan_out, ReLU gain sqrt(2): the GraSP reference and torchvision conv init.
conv_kernel_init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# He normal on fan_in: used for hidden dense layers of the small MLP/LeNet models, where the
# reference's N(0, 0.01) would shrink the signal at every layer and stall training.
dense_hidden_init = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")

# N(0, 0.01): every linear layer of the GraSP reference's weights_init (zero bias with it).
dense_kernel_init = jax.nn.initializers.normal(stddev=0.01)

zeros = jax.nn.initializers.zeros

# PyTorch BatchNorm defaults expressed in Flax's convention.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def batch_norm(train: bool, dtype: Any = jnp.float32, name: str | None = None) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults; batch statistics in train mode, running ones otherwise."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        name=name,
    )


# A module type, as Flax's own examples inject one (``conv: ModuleDef = nn.Conv``).
ModuleDef = Any

#: The convolution of every paper model: ``nn.Conv`` with PyTorch's ``Conv2d`` defaults where
#: they differ from Flax's (no padding unless asked; an integer ``padding=p`` pads p on each side,
#: unlike ``'SAME'``, which pads (0, 1) for stride 2 on even inputs), no bias unless asked (every
#: reference conv but torchvision VGG's and LeNet's), the reference's Kaiming fan-out init with
#: zero bias, and :func:`grasp_jax.models.conv.conv_general_dilated` in its default mode: the
#: patches fast path on XLA:CPU where it was measured to win, XLA's own convolution everywhere
#: else (GPU/TPU, other shapes). ``GRASP_JAX_FAST_CONV=0`` forces native, read when traced.
#: Called as ``Conv(features, (3, 3), strides=2, padding=1, name=...)``.
Conv: ModuleDef = functools.partial(
    nn.Conv,
    padding=0,
    use_bias=False,
    kernel_init=conv_kernel_init,
    bias_init=zeros,
    conv_general_dilated=fast_conv.conv_general_dilated,
)

#: ``Conv`` with XLA's own convolution (``lax.conv_general_dilated``) whatever the environment.
NativeConv: ModuleDef = functools.partial(Conv, conv_general_dilated=lax.conv_general_dilated)


# Convenience for the classifiers of the GraSP reference and torchvision VGG.
dense = functools.partial(nn.Dense, kernel_init=dense_kernel_init, bias_init=zeros)
