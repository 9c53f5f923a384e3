"""The paper's networks (Flax Linen, NHWC) and a registry to build them by name.

Every model is called as ``model.apply(variables, x, train=...)`` with NHWC images, returns float32
logits, and has the fields ``num_classes``, ``dtype`` (computation dtype) and ``conv``: the
convolution module type every conv layer is built from, injected once as in Flax's own examples.
The default, :data:`Conv`, is ``nn.Conv`` with the reference's init and PyTorch's padding and bias
defaults, convolving with :func:`grasp_jax.models.conv.conv_general_dilated` in auto mode: XLA:CPU's
slow convolutions (3x3 on 1x1/2x2 maps, 1x1 with >= 16 channels) run as matmuls, everything else
and every GPU/TPU convolution natively. ``GRASP_JAX_FAST_CONV=0`` or ``conv=NativeConv`` forces
XLA's own convolution; ``functools.partial(Conv, conv_general_dilated=f)`` uses any drop-in ``f``
for ``lax.conv_general_dilated``. BatchNorm models keep running statistics in the
``batch_stats`` collection (``mutable=['batch_stats']`` when ``train=True``). Every conv/dense
weight is a leaf named ``kernel``, which is what the pruning code treats as prunable.

Registry names (``ARCHS``):

* ``vgg11/13/16/19``: GraSP-reference VGG for CIFAR (32x32) and Tiny-ImageNet (64x64).
* ``resnet20/32/44/56/110``: GraSP-reference CIFAR ResNet (widths 32/64/128).
* ``resnet50``: torchvision ResNet-50 (v1.5), 224x224 ImageNet.
* ``vgg16_imagenet`` / ``vgg16_bn_imagenet``: torchvision ``vgg16`` / ``vgg16_bn``, 224x224;
  their dropout needs ``rngs={'dropout': key}`` when ``train=True``.
* ``lenet5``, ``mlp``, ``small_vgg``: small models for tests and the offline demo.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from grasp_jax.models.init import Conv, NativeConv
from grasp_jax.models.resnet_cifar import ResNetCifar
from grasp_jax.models.resnet_imagenet import ResNetImageNet
from grasp_jax.models.small import MLP, LeNet5
from grasp_jax.models.vgg import CIFAR_CFGS, VGG, VGGImageNet

# A short BatchNorm VGG: 8x8 inputs end at 2x2, 32x32 at 8x8.
SMALL_VGG_CFG = (16, "M", 32, "M", 64)

# name -> constructor taking (num_classes=..., **fields). The one list of valid names.
ARCHS: dict[str, Callable[..., nn.Module]] = {
    **{f"vgg{d}": functools.partial(VGG, cfg=CIFAR_CFGS[d]) for d in (11, 13, 16, 19)},
    **{f"resnet{d}": functools.partial(ResNetCifar, depth=d) for d in (20, 32, 44, 56, 110)},
    "resnet50": functools.partial(ResNetImageNet, stage_sizes=(3, 4, 6, 3)),
    "vgg16_imagenet": functools.partial(VGGImageNet, batch_norm=False),
    "vgg16_bn_imagenet": functools.partial(VGGImageNet, batch_norm=True),
    "lenet5": LeNet5,
    "mlp": MLP,
    "small_vgg": functools.partial(VGG, cfg=SMALL_VGG_CFG),
}


def get_model(arch: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Builds the network registered as ``arch``; ``kwargs`` set other fields (dtype, conv)."""
    if arch not in ARCHS:
        raise ValueError(f"Unknown arch {arch!r}; valid names: {', '.join(ARCHS)}")
    return ARCHS[arch](num_classes=num_classes, **kwargs)


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. eval_shape's)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def count_kernel_params(params: Any) -> int:
    """Number of scalars in conv/dense weights: leaves named ``kernel`` with ndim >= 2."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        last = path[-1]
        if getattr(last, "key", None) == "kernel" and len(leaf.shape) >= 2:
            total += math.prod(leaf.shape)
    return total


def layer_order(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """The model's submodules as ``/``-joined paths, in the order a forward pass calls them.

    Param trees flatten with sorted keys (``classifier`` before ``conv0``,
    ``conv10`` before ``conv2``); reports list layers in this order instead.
    Traced abstractly (``jax.eval_shape``): no FLOPs, no memory.
    ``input_shape`` excludes the batch axis.
    """
    order: list[str] = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            path = "/".join(context.module.path)
            if path and path not in order:
                order.append(path)
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, *input_shape), jax.numpy.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return order


__all__ = [
    "ARCHS",
    "MLP",
    "SMALL_VGG_CFG",
    "VGG",
    "Conv",
    "LeNet5",
    "NativeConv",
    "ResNetCifar",
    "ResNetImageNet",
    "VGGImageNet",
    "count_kernel_params",
    "count_params",
    "get_model",
    "layer_order",
]
