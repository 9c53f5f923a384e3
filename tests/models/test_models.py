"""Tests for grasp_jax.models: pinned sizes, shapes, naming, init statistics, BatchNorm defaults.

Large models are only traced (jax.eval_shape); real initialisation is done for small ones.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grasp_jax import models
from grasp_jax.models import init as minit

# arch -> (input HWC, num_classes) it is meant for.
INPUTS = {
    **{f"vgg{d}": ((32, 32, 3), 10) for d in (11, 13, 16, 19)},
    **{f"resnet{d}": ((32, 32, 3), 10) for d in (20, 32, 44, 56, 110)},
    "resnet50": ((224, 224, 3), 1000),
    "vgg16_imagenet": ((224, 224, 3), 1000),
    "vgg16_bn_imagenet": ((224, 224, 3), 1000),
    "lenet5": ((8, 8, 1), 10),
    "mlp": ((8, 8, 1), 10),
    "small_vgg": ((32, 32, 3), 10),
}

# (all params incl. BN scale/bias, params in conv/dense kernels): the paper's (VGG19,
# ResNet-32) and torchvision's totals; the ImageNet kernel counts are those totals less BN
# scale/bias and biases.
PINNED = {
    "vgg19": (20_035_018, 20_024_000),
    "resnet32": (1_860_522, 1_855_584),
    "resnet50": (25_557_032, 25_502_912),
    "vgg16_imagenet": (138_357_544, 138_344_128),
    "vgg16_bn_imagenet": (138_365_992, 138_344_128),
}


def _shape_init(model, shape):
    x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


@functools.cache
def _traced(arch):
    """Abstract variables, abstract logits, and the number of conv calls made by one forward."""
    shape, num_classes = INPUTS[arch]
    calls = []

    def counting_conv(*args, **kwargs):
        calls.append(1)
        return jax.lax.conv_general_dilated(*args, **kwargs)

    conv = functools.partial(models.Conv, conv_general_dilated=counting_conv)
    model = models.get_model(arch, num_classes, conv=conv)
    variables = _shape_init(model, shape)
    n_init_calls = len(calls)
    x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    return variables, logits, n_init_calls


def test_registry_covers_all_archs():
    assert set(models.ARCHS) == set(INPUTS)


@pytest.mark.parametrize("arch", sorted(PINNED))
def test_pinned_parameter_counts(arch):
    variables, _, _ = _traced(arch)
    total, kernels = PINNED[arch]
    assert models.count_params(variables["params"]) == total
    if kernels is not None:
        assert models.count_kernel_params(variables["params"]) == kernels


@pytest.mark.parametrize("arch", sorted(INPUTS))
def test_output_shape_naming_and_conv_hook(arch):
    variables, logits, n_conv_calls = _traced(arch)
    assert logits.shape == (2, INPUTS[arch][1]) and logits.dtype == jnp.float32
    leaves = jax.tree_util.tree_leaves_with_path(variables["params"])
    n_conv_kernels = 0
    for path, leaf in leaves:
        name = path[-1].key
        # Pruning treats leaves named 'kernel' with ndim >= 2 as the prunable weights.
        assert (name == "kernel") == (leaf.ndim >= 2), (arch, path)
        n_conv_kernels += leaf.ndim == 4
    # The injected convolution is used by every conv layer.
    assert n_conv_calls == n_conv_kernels
    assert n_conv_kernels > 0 or arch == "mlp"


@pytest.mark.parametrize("arch", ["vgg19", "resnet32"])
def test_tiny_imagenet_shapes(arch):
    model = models.get_model(arch, 200)
    variables = _shape_init(model, (64, 64, 3))
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    assert jax.eval_shape(lambda v, x: model.apply(v, x), variables, x).shape == (2, 200)
    # Global pooling: the parameter count does not depend on the input size.
    assert models.count_params(variables["params"]) == models.count_params(
        _traced(arch)[0]["params"]) + 190 * (128 if arch == "resnet32" else 512) + 190


def test_resnet50_block_layout():
    params = _traced("resnet50")[0]["params"]
    stages = [sum(k.startswith(f"layer{s}_") for k in params) for s in range(1, 5)]
    assert stages == [3, 4, 6, 3]
    # v1.5: the stride-2 sits on the 3x3 conv; 1x1 downsample projection in each first block.
    assert params["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert "downsample_conv" in params["layer1_0"] and "downsample_conv" not in params["layer1_1"]


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError) as err:
        models.get_model("vgg99", 10)
    for name in models.ARCHS:
        assert name in str(err.value)


def test_bad_resnet_depth():
    with pytest.raises(ValueError, match="6n\\+2"):
        _shape_init(models.ResNetCifar(depth=33), (32, 32, 3))


def test_lenet5_also_takes_cifar_images():
    model = models.get_model("lenet5", 10)
    variables = _shape_init(model, (32, 32, 3))
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    assert jax.eval_shape(lambda v, x: model.apply(v, x), variables, x).shape == (2, 10)


@pytest.fixture(scope="module")
def small_vgg_init():
    model = models.get_model("small_vgg", 10)
    x = jax.random.normal(jax.random.key(3), (4, 8, 8, 1))
    return model, x, jax.jit(model.init)


@pytest.mark.parametrize("arch", ["mlp", "small_vgg"])
def test_init_deterministic(arch, small_vgg_init):
    if arch == "small_vgg":
        model, x, init_fn = small_vgg_init
    else:
        model, x = models.get_model(arch, 10), jnp.ones((1, 8, 8, 1))
        init_fn = jax.jit(model.init)
    a, b, c = (init_fn(jax.random.key(k), x) for k in (1, 1, 2))
    same = jax.tree_util.tree_map(lambda p, q: bool(jnp.array_equal(p, q)), a, b)
    assert all(jax.tree_util.tree_leaves(same))
    kernels_equal = [bool(jnp.array_equal(p, q)) for (path, p), q in zip(
        jax.tree_util.tree_leaves_with_path(a["params"]), jax.tree_util.tree_leaves(c["params"]))
        if path[-1].key == "kernel"]
    assert kernels_equal and not any(kernels_equal)


def test_init_statistics(small_vgg_init):
    _model, x, init_fn = small_vgg_init
    variables = init_fn(jax.random.key(0), x)
    params = variables["params"]
    # Kaiming normal, fan_out = 3*3*out: an untruncated normal with std sqrt(2/fan_out).
    w = np.asarray(params["conv2"]["kernel"])  # (3, 3, 32, 64)
    std = np.sqrt(2.0 / (3 * 3 * 64))
    assert abs(w.std() / std - 1) < 0.03 and abs(w.mean()) < 0.03 * std
    assert np.abs(w).max() > 3 * std  # a truncated normal would stop at 2 std
    fc = np.asarray(params["classifier"]["kernel"])  # N(0, 0.01), zero bias
    assert abs(fc.std() / 0.01 - 1) < 0.15 and not params["classifier"]["bias"].any()
    bn = params["bn1"]
    assert (bn["scale"] == 1).all() and (bn["bias"] == 0).all()
    stats = variables["batch_stats"]["bn1"]
    assert (stats["mean"] == 0).all() and (stats["var"] == 1).all()


def test_kaiming_fan_out_on_a_vgg19_layer_shape():
    w = minit.conv_kernel_init(jax.random.key(0), (3, 3, 512, 512))
    assert abs(float(w.std()) / np.sqrt(2.0 / (9 * 512)) - 1) < 0.01


# The ImageNet networks at reduced depth/width: the same layer types and init code as the
# registered ones (ResNet-50's 2048 -> 1000 fc, VGG-16's 4096-wide classifier), cheap to draw.
REDUCED_IMAGENET = {
    "resnet50": ({"stage_sizes": (1, 1, 1, 1)}, (32, 32, 3)),
    "vgg16_imagenet": ({"cfg": (8, "M")}, (14, 14, 3)),
    "vgg16_bn_imagenet": ({"cfg": (8, "M")}, (14, 14, 3)),
}


@pytest.mark.parametrize("arch", sorted(REDUCED_IMAGENET))
def test_imagenet_init_is_the_references_weights_init(arch):
    """The authors' weights_init, applied to torchvision's networks before pruning: Kaiming-normal
    fan-out convs with zero bias, Linear N(0, 0.01) with zero bias, BatchNorm scale 1, bias 0."""
    fields, shape = REDUCED_IMAGENET[arch]
    model = models.ARCHS[arch](num_classes=1000, **fields)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *shape)))
    n_dense = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
        name, leaf = jax.tree_util.keystr(path), np.asarray(leaf)
        if name.endswith("['bias']"):  # conv, linear and BatchNorm biases alike
            assert not leaf.any(), name
        elif name.endswith("['scale']"):
            assert (leaf == 1).all(), name
        elif leaf.ndim == 2:  # linear: N(0, 0.01), at least 1e6 draws per layer here
            n_dense += 1
            assert abs(leaf.std() / 0.01 - 1) < 0.01 and abs(leaf.mean()) < 1e-4, name
        elif leaf.size >= 10_000:  # conv: std sqrt(2 / fan_out), fan_out = kh * kw * out
            std = np.sqrt(2.0 / (np.prod(leaf.shape[:2]) * leaf.shape[-1]))
            assert abs(leaf.std() / std - 1) < 0.05, name
    assert n_dense == (1 if arch == "resnet50" else 3)
    if arch == "resnet50":  # no longer torchvision's U(-1/sqrt(2048), 1/sqrt(2048)) for fc
        assert np.abs(np.asarray(variables["params"]["fc"]["kernel"])).max() > 1 / np.sqrt(2048)


def test_batchnorm_defaults_match_pytorch(small_vgg_init):
    bn = minit.batch_norm(train=True)
    assert (bn.momentum, bn.epsilon, bn.use_running_average) == (0.9, 1e-5, False)
    assert minit.batch_norm(train=False).use_running_average
    model, x, init_fn = small_vgg_init
    variables = init_fn(jax.random.key(0), x)
    # Eval mode with fresh statistics: bn(y) = y / sqrt(1 + eps).
    _, inter = model.apply(variables, x, capture_intermediates=True)
    y = inter["intermediates"]["conv0"]["__call__"][0]
    z = inter["intermediates"]["bn0"]["__call__"][0]
    np.testing.assert_allclose(z, y / np.sqrt(1 + 1e-5), rtol=1e-6, atol=1e-7)
    # Train mode: running mean <- 0.9 * old + 0.1 * batch mean (PyTorch momentum 0.1).
    _, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(updated["batch_stats"]["bn0"]["mean"], 0.1 * y.mean(axis=(0, 1, 2)),
                               rtol=1e-5, atol=1e-7)


def test_train_mode_and_dtype():
    model = models.get_model("small_vgg", 10, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    variables = _shape_init(model, (8, 8, 1))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables["params"]))
    logits, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
    assert set(state) == {"batch_stats"}


def test_vgg_imagenet_dropout_needs_rng():
    model = models.get_model("vgg16_imagenet", 1000)
    variables = _traced("vgg16_imagenet")[0]
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True), variables, x)
    rngs = {"dropout": jax.random.key(0)}
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs=rngs), variables, x)
    assert out.shape == (1, 1000)


def test_vgg_imagenet_classifier_widths_are_a_field_with_torchvisions_as_default():
    default = _shape_init(models.get_model("vgg16_imagenet", 1000, cfg=(8, "M")), (14, 14, 3))
    assert [default["params"][f"fc{j}"]["kernel"].shape for j in (1, 2, 3)] == [
        (7 * 7 * 8, 4096), (4096, 4096), (4096, 1000)]
    narrow = _shape_init(models.get_model("vgg16_imagenet", 5, cfg=(8, "M"), hidden_widths=(6,)),
                         (14, 14, 3))
    assert sorted(k for k in narrow["params"] if k.startswith("fc")) == ["fc1", "fc2"]
    assert narrow["params"]["fc1"]["kernel"].shape == (7 * 7 * 8, 6)
    assert narrow["params"]["fc2"]["kernel"].shape == (6, 5)  # the output layer, last


def test_adaptive_avg_pool_matches_pytorch_bins():
    from grasp_jax.models.vgg import adaptive_avg_pool

    x = jnp.arange(2 * 5 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 5, 1)
    y = adaptive_avg_pool(x, (3, 3))
    # PyTorch bins for 5 -> 3: [0, 2), [1, 4), [3, 5).
    np.testing.assert_allclose(y[0, 1, 2, 0], x[0, 1:4, 3:5, 0].mean(), rtol=1e-6)
    assert adaptive_avg_pool(x, (5, 5)) is x


def test_layer_order_is_the_order_of_the_forward_pass():
    order = models.layer_order(models.get_model("small_vgg", 10), (32, 32, 3))
    assert order == ["conv0", "bn0", "conv1", "bn1", "conv2", "bn2", "classifier"]
    order = models.layer_order(models.get_model("resnet20", 10), (32, 32, 3))
    assert order[:3] == ["conv1", "bn1", "layer1_0"] and order[-1] == "fc"
    # Sorted keys would put layer3_0/shortcut_conv before layer3_1 anyway; a string sort
    # would also put fc before layer1_0.
    assert order.index("layer2_0/shortcut_conv") < order.index("layer2_1/conv1")
    assert order.index("layer3_2/conv2") < order.index("fc")
