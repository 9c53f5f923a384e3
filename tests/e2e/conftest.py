"""Fixtures of the end-to-end runs."""

import functools

import pytest

from grasp_jax import models

from tests.helpers.runs import TINY_RESNET, TINY_RESNET_STAGES

# torchvision's VGG-16 for ImageNet (no BatchNorm; five pools, adaptive 7x7 average pool, two
# hidden Linear layers with dropout, fc3) at one narrow conv per stage and a 64-wide
# classifier: the ImageNet protocol on a VGG without VGG-16's 138M parameters.
TINY_VGG = "vgg_imagenet_tiny"
TINY_VGG_FIELDS = dict(cfg=(8, "M", 16, "M", 32, "M", 32, "M", 32, "M"), hidden_widths=(64, 64),
                       batch_norm=False)


@pytest.fixture
def tiny_resnet(monkeypatch):
    """The arch name of a one-block-per-stage bottleneck ResNet, registered for this test."""
    monkeypatch.setitem(models.ARCHS, TINY_RESNET,
                        functools.partial(models.ResNetImageNet, stage_sizes=TINY_RESNET_STAGES))
    return TINY_RESNET


@pytest.fixture
def tiny_vgg(monkeypatch):
    """The arch name of a VGG-16-shaped ImageNet network at small widths, registered for this
    test."""
    monkeypatch.setitem(models.ARCHS, TINY_VGG,
                        functools.partial(models.VGGImageNet, **TINY_VGG_FIELDS))
    return TINY_VGG
