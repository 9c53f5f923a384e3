"""Fixtures of the end-to-end runs."""

import functools

import pytest

from grasp_jax import models

from tests.helpers.runs import TINY_RESNET, TINY_RESNET_STAGES


@pytest.fixture
def tiny_resnet(monkeypatch):
    """The arch name of a one-block-per-stage bottleneck ResNet, registered for this test."""
    monkeypatch.setitem(models.ARCHS, TINY_RESNET,
                        functools.partial(models.ResNetImageNet, stage_sizes=TINY_RESNET_STAGES))
    return TINY_RESNET
