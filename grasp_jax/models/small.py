"""Small networks for fast tests and the offline demo (not in the GraSP paper's experiments).

* ``LeNet5``: LeCun et al.'s 6-16 conv / 120-84 dense LeNet-5 with ReLU and max-pooling. Both
  5x5 convs are padded by 2 so that 8x8x1 digits (scikit-learn) end at 2x2 and 32x32x3 CIFAR at
  8x8; the dense layers adapt to whichever.
* ``MLP``: flattens any input; LeNet-300-100 by default, the classic pruning benchmark.
* The small BatchNorm VGG (``small_vgg`` in the registry) is ``vgg.VGG`` with a short config.

Convs use the reference's Kaiming fan_out init; hidden dense layers use He fan_in (so the signal
survives several layers); the output layer uses the reference's N(0, 0.01) with zero bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from grasp_jax.models import init


def _hidden_dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=init.dense_hidden_init,
                    bias_init=init.zeros, name=name)


class LeNet5(nn.Module):
    """LeNet-5 for NHWC images of any size divisible by 4 (8x8x1, 28x28x1, 32x32x3, ...).

    Parameter names: ``conv1``, ``conv2``, ``fc1``, ``fc2``, ``fc3``. ``train`` is accepted for a
    uniform interface and has no effect.
    """

    num_classes: int = 10
    dtype: Any = jnp.float32
    conv: init.ModuleDef = init.Conv

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        del train
        for i, width in enumerate((6, 16)):
            x = self.conv(width, (5, 5), padding=2, use_bias=True, dtype=self.dtype,
                          name=f"conv{i + 1}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(_hidden_dense(120, self.dtype, "fc1")(x))
        x = nn.relu(_hidden_dense(84, self.dtype, "fc2")(x))
        x = init.dense(self.num_classes, dtype=self.dtype, name="fc3")(x)
        return x.astype(jnp.float32)


class MLP(nn.Module):
    """Fully connected ReLU network on the flattened input.

    Parameter names: ``fc1`` ... ``fc{len(hidden)}``, ``classifier``. ``conv`` exists only for a
    uniform interface (there are no convs); ``train`` has no effect.
    """

    num_classes: int = 10
    hidden: Sequence[int] = (300, 100)
    dtype: Any = jnp.float32
    conv: init.ModuleDef = init.Conv

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        del train
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.relu(_hidden_dense(width, self.dtype, f"fc{i + 1}")(x))
        x = init.dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        return x.astype(jnp.float32)
