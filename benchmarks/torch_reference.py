"""PyTorch twins of grasp_jax's CIFAR VGG19 and ResNet-32, and the authors' GraSP algorithm.

Only ``benchmarks.vs_pytorch`` imports this module, and only when PyTorch is installed (the
``benchmarks`` extra); the library and its tests never import torch.

* ``VGG`` / ``ResNet``: the same layers as ``grasp_jax.models.VGG`` (GraSP reference
  ``models/base/vgg.py``) and ``ResNetCifar`` (``models/base/resnet.py``), in NCHW, with module
  names mirroring the Flax parameter names so that :func:`load_flax_params` can copy a Flax
  initialization into them (the same weights on both sides of a timing).
* :func:`grasp_scores`: the computation of the authors' ``pruner/GraSP.py`` (double backprop):
  a copy of the network with its Linear weights redrawn Xavier-normal, g summed over two halves
  of the batch, then for each half ``z = Σ g · ∇L`` (``create_graph=True``) and ``z.backward()``,
  and the scores ``-θ ⊙ Hg``. Written here from reading that file, not copied from it; the
  mask selection that follows it there is left out (as on the JAX side).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


class VGG(nn.Module):
    """3x3 conv (no bias) + BN + ReLU per entry of ``cfg``, 2x2 max-pool at 'M', global average
    pool, one Linear classifier."""

    def __init__(self, cfg: Sequence[int | str], num_classes: int = 10):
        super().__init__()
        self.layers = nn.ModuleDict()
        self.cfg, channels, i = tuple(cfg), 3, 0
        for v in cfg:
            if v != "M":
                self.layers[f"conv{i}"] = nn.Conv2d(channels, v, 3, padding=1, bias=False)
                self.layers[f"bn{i}"] = _bn(v)
                channels, i = v, i + 1
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = 0
        for v in self.cfg:
            if v == "M":
                x = F.max_pool2d(x, 2)
            else:
                x = F.relu(self.layers[f"bn{i}"](self.layers[f"conv{i}"](x)))
                i += 1
        return self.classifier(x.mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = _bn(cout)
        self.shortcut_conv = self.shortcut_bn = None
        if stride != 1 or cin != cout:
            self.shortcut_conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.shortcut_bn = _bn(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.shortcut_conv is not None:
            x = self.shortcut_bn(self.shortcut_conv(x))
        return F.relu(y + x)


class ResNet(nn.Module):
    """The GraSP reference's CIFAR ResNet of depth 6n+2, widths 32/64/128."""

    def __init__(self, depth: int = 32, num_classes: int = 10, widths=(32, 64, 128)):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = _bn(widths[0])
        self.blocks = nn.ModuleDict()
        cin = widths[0]
        for s, width in enumerate(widths):
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                self.blocks[f"layer{s + 1}_{b}"] = BasicBlock(cin, width, stride)
                cin = width
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for block in self.blocks.values():
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))


def _module(root: nn.Module, names: Sequence[str]) -> nn.Module:
    """The submodule at a Flax path: blocks/layers live in a ModuleDict, the rest are attributes."""
    m = root
    for name in names:
        holder = getattr(m, "blocks", None) or getattr(m, "layers", None)
        m = holder[name] if holder is not None and name in holder else getattr(m, name)
    return m


def load_flax_params(model: nn.Module, params: Any) -> None:
    """Copies Flax ``params`` (NHWC kernels) into the twin ``model`` (NCHW), in place."""
    flat = {}

    def visit(tree, path):
        for key, value in tree.items():
            (visit(value, (*path, key)) if isinstance(value, dict) else
             flat.__setitem__((*path, key), np.asarray(value)))

    visit(dict(params), ())
    with torch.no_grad():
        for (*path, leaf), value in flat.items():
            m = _module(model, path)
            if leaf == "kernel":
                value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
                m.weight.copy_(torch.from_numpy(np.ascontiguousarray(value)))
            elif leaf in ("scale", "bias"):
                target = m.weight if leaf == "scale" else m.bias
                target.copy_(torch.from_numpy(value.copy()))
            else:
                raise ValueError(f"unexpected parameter {'/'.join((*path, leaf))}")


def training_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The gradient of the mean cross-entropy (BatchNorm in training mode) w.r.t. every weight."""
    loss = F.cross_entropy(model(x), y)
    return list(torch.autograd.grad(loss, [p for p in model.parameters()]))


def grasp_scores(net: nn.Module, x: torch.Tensor, y: torch.Tensor, temperature: float = 200.0,
                 halves: int = 2) -> list[torch.Tensor]:
    """-θ ⊙ Hg for every conv and Linear weight, computed as the authors' GraSP does."""
    net = copy.deepcopy(net)
    net.zero_grad()
    weights = []
    for layer in net.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            weights.append(layer.weight)
    chunks = list(zip(torch.chunk(x, halves), torch.chunk(y, halves)))
    g = None
    for xc, yc in chunks:  # g = Σ_c ∇L(b_c)
        grads = torch.autograd.grad(F.cross_entropy(net(xc) / temperature, yc), weights)
        g = list(grads) if g is None else [a + b for a, b in zip(g, grads)]
    for xc, yc in chunks:  # weight.grad accumulates Σ_c H_c g
        grads = torch.autograd.grad(F.cross_entropy(net(xc) / temperature, yc), weights,
                                    create_graph=True)
        z = sum((gi.detach() * fi).sum() for gi, fi in zip(g, grads))
        z.backward()
    return [-w.detach() * w.grad for w in weights]
