"""The programs a GPU or TPU would run, lowered from this CPU host.

``jax.export`` lowers for ``cuda`` and ``tpu`` without the hardware. For each
program the project runs on an accelerator (scoring in memory, both paths;
the streamed ImageNet HVP step; the runner's train and eval steps) this
checks that it lowers, that the accelerator programs hold none of the CPU
path's ops (the fusion barrier's cond, the patches formulation of the
convolution: each under a named scope the module's locations carry) and have
the native model's convolutions, and that scoring asks HIGHEST (float32)
precision of every convolution and dot_general. Lowered for ``cpu`` the same
programs do hold the CPU path, so each check can fail.

Inputs are ``jax.ShapeDtypeStruct``s (from ``jax.eval_shape``): nothing large
is allocated and nothing is compiled.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

import grasp_jax as gj
from grasp_jax import models
from grasp_jax.models import conv as conv_lib

from experiments import config_schema, configs, steps
from experiments.data_scoring import make_loss_fn
from experiments.streamed_scoring import accumulation_step
from tests.helpers.lowering import (
    exported_text,
    has_barrier,
    has_patches,
    matmul_precisions,
    op_count,
)

ACCELERATORS = ("cuda", "tpu")
PLATFORMS = ("cpu", *ACCELERATORS)


@pytest.fixture(autouse=True)
def auto_mode(monkeypatch):
    # The default convolution as a run uses it.
    monkeypatch.delenv(conv_lib.FAST_CONV_ENV, raising=False)


@functools.cache
def _abstract_variables(arch: str, num_classes: int, image: tuple[int, ...]):
    """Abstract params; the BatchNorm statistics concrete (small), as the losses close over
    them."""
    model = models.get_model(arch, num_classes, conv=models.NativeConv)
    x = jax.ShapeDtypeStruct((1, *image), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    stats = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   variables.get("batch_stats", {}))
    return {"params": variables["params"], "batch_stats": stats}


def _scoring(arch, num_classes, image, batch_size, conv=None):
    """(loss_fn, params, batch) as abstract values, for the model with ``conv``."""
    model = models.get_model(arch, num_classes, **({} if conv is None else {"conv": conv}))
    variables = _abstract_variables(arch, num_classes, image)
    batch = {"image": jax.ShapeDtypeStruct((batch_size, *image), jnp.float32),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

    def loss_fn(params, b):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                b["image"], train=True, mutable=["batch_stats"])
        return gj.cross_entropy_with_temperature(logits, b["label"], 200.0)

    return loss_fn, variables["params"], batch


def _assert_platform_choices(texts: dict[str, str], native: str | None = None) -> None:
    """The CPU program holds the CPU path; the accelerators' hold none of it and have the
    convolutions of ``native`` (the same program with XLA's convolution), when given."""
    assert has_barrier(texts["cpu"]) and has_patches(texts["cpu"])
    for platform in ACCELERATORS:
        text = texts[platform]
        assert not has_barrier(text) and not has_patches(text), platform
        if native is not None:
            assert op_count(text, "convolution") == op_count(native, "convolution"), platform
            assert op_count(text, "dot_general") == op_count(native, "dot_general"), platform
    if native is not None:
        assert op_count(texts["cpu"], "convolution") < op_count(native, "convolution")


def _assert_float32_precision(text: str) -> None:
    found = matmul_precisions(text)
    assert found and set(found) == {"HIGHEST"}, sorted(set(found))


# ResNet-20 on 8x8 images: its last stage runs 3x3 convs on 2x2 maps and its shortcuts are
# 1x1, so the CPU path patches both kinds; the batch is two chunks of 4.
SCORING_MODEL = ("resnet20", 10, (8, 8, 3), 8)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["all chunks at once", "one chunk at a time"])
def test_grasp_scores_lowers_for_each_platform_with_its_own_choices(path):
    budget = None if path == "all chunks at once" else 0  # 0: the traced one-at-a-time loop
    loss_fn, params, batch = _scoring(*SCORING_MODEL)

    def score(p, b, loss_fn=loss_fn):
        return gj.grasp_scores(p, loss_fn, b, num_microbatches=2, memory_budget_bytes=budget)

    texts = {platform: exported_text(score, params, batch, platform=platform)
             for platform in PLATFORMS}
    native_loss, _, _ = _scoring(*SCORING_MODEL, conv=models.NativeConv)
    native = exported_text(functools.partial(score, loss_fn=native_loss), params, batch,
                           platform="cuda")
    _assert_platform_choices(texts, native)
    for text in texts.values():
        _assert_float32_precision(text)
    if budget == 0:
        # The chunk loop: unrolled where it runs on the CPU, a loop on the accelerators.
        assert op_count(texts["cpu"], "while") == 0
        assert all(op_count(texts[p], "while") >= 1 for p in ACCELERATORS)


def test_scoring_precision_can_be_left_to_the_backend():
    # A conv and a dense layer as a plain dict: precision does not depend on the model.
    params = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32)},
              "dense": {"kernel": jax.ShapeDtypeStruct((4 * 4 * 4, 10), jnp.float32)}}
    batch = {"image": jax.ShapeDtypeStruct((8, 4, 4, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((8,), jnp.int32)}

    def loss_fn(p, b):
        h = jax.lax.conv_general_dilated(b["image"], p["conv"]["kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        logits = jnp.tanh(h).reshape(h.shape[0], -1) @ p["dense"]["kernel"]
        return gj.cross_entropy_with_temperature(logits, b["label"], 200.0)
    text = exported_text(lambda p, b: gj.grasp_scores(p, loss_fn, b, num_microbatches=2,
                                                      matmul_precision=None),
                         params, batch, platform="tpu")
    assert set(matmul_precisions(text)) == {"DEFAULT"}
    text = exported_text(lambda p, b: gj.snip_scores(p, loss_fn, b, num_microbatches=2),
                         params, batch, platform="tpu")
    _assert_float32_precision(text)


def test_gradient_flow_traces_its_program_at_float32(monkeypatch):
    # gradient_flow returns Python floats, so its program cannot be exported from outside:
    # record the precision in force where it is traced and called.
    from grasp_jax import diagnostics

    seen = []
    real = diagnostics._flow

    def recording(*args, **kwargs):
        seen.append(jax.config.jax_default_matmul_precision)
        return real(*args, **kwargs)

    monkeypatch.setattr(diagnostics, "_flow", recording)
    params = {"dense": {"kernel": jnp.ones((3, 2))}}
    batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros((4, 2))}

    def loss_fn(p, b):
        return jnp.mean((b["x"] @ p["dense"]["kernel"] - b["y"]) ** 2)

    gj.gradient_flow(params, loss_fn, batch)
    gj.gradient_flow(params, loss_fn, batch, matmul_precision=None)
    assert seen == ["float32", None]


@pytest.mark.slow
def test_streamed_imagenet_hvp_step_lowers_for_accelerators():
    # The runner's data-parallel streamed step, ResNet-50 at 224x224, chunks of 20.
    arch, classes, image, chunk = "resnet50", 1000, (224, 224, 3), 20
    model = models.get_model(arch, classes)
    variables = _abstract_variables(arch, classes, image)
    loss_fn = make_loss_fn(model, variables["batch_stats"], 200.0, jax.random.key(0))
    step = jax.jit(accumulation_step("hvp", loss_fn, chunk, short=False))
    params = variables["params"]
    chunks = {"image": jax.ShapeDtypeStruct((1, 2 * chunk, *image), jnp.float32),
              "label": jax.ShapeDtypeStruct((1, 2 * chunk), jnp.int32)}
    acc = _replicated(params)
    texts = {platform: exported_text(step, params, chunks, params, acc, platform=platform)
             for platform in PLATFORMS}
    _assert_platform_choices(texts)
    for platform in ACCELERATORS:
        # Every ResNet-50 conv runs natively: none of its 53 is a matmul of patches.
        assert op_count(texts[platform], "convolution") >= 53
    for text in texts.values():
        _assert_float32_precision(text)


def _replicated(tree, devices: int = 1):
    """Abstract values with a leading device axis, as pmap takes a replicated pytree."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct((devices, *x.shape), x.dtype), tree)


def _runner_steps(arch: str, dataset: str, per_device: int):
    """The train and eval steps as the runner builds them (``steps.make_*_step``, pmapped),
    each under ``jax.jit``, with abstract one-device inputs."""
    config = configs.resolve(dataset=dataset, arch=arch, method="grasp", steps_per_epoch=10)
    info = config_schema.dataset_info(config)
    image = tuple(info.image_shape)
    model = models.get_model(arch, info.num_classes)
    variables = jax.eval_shape(lambda: steps.init_variables(model, jax.random.PRNGKey(0), image))
    masks = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, bool),
                                   variables["params"])
    # The state as the runner creates it (its masks inside the optimizer's state); the step's
    # own transform reads the masks from that state, so it is built on abstract ones.
    state = jax.eval_shape(
        lambda v, m: steps.create_state(v, m, steps.make_optimizer(config, m),
                                        jax.random.PRNGKey(1)), variables, masks)
    tx = steps.make_optimizer(config, masks)
    rstate = _replicated(state)
    batch = {"image": jax.ShapeDtypeStruct((1, per_device, *image), jnp.float32),
             "label": jax.ShapeDtypeStruct((1, per_device), jnp.int32)}
    train = (jax.jit(steps.make_train_step(model, tx)), rstate, batch)
    eval_batch = {**batch, "mask": jax.ShapeDtypeStruct((1, per_device), jnp.bool_)}
    evaluate = (jax.jit(steps.make_eval_step(model)), rstate, eval_batch)
    return train, evaluate


@pytest.mark.slow
@pytest.mark.parametrize("arch, dataset", [("vgg19", "cifar10"), ("resnet50", "imagenet2012")])
def test_runner_train_and_eval_steps_lower_for_accelerators(arch, dataset):
    train, evaluate = _runner_steps(arch, dataset, per_device=2)
    for kind, (step, state, batch) in (("train", train), ("eval", evaluate)):
        texts = {platform: exported_text(step, state, batch, platform=platform)
                 for platform in PLATFORMS}
        for platform in ACCELERATORS:
            text = texts[platform]
            assert not has_barrier(text) and not has_patches(text), (kind, platform)
            assert op_count(text, "convolution") >= 16, (kind, platform)  # XLA's own, each
        # On the CPU the same steps read every conv input through the barrier, and training
        # takes the patches path (VGG19's 2x2 maps, ResNet-50's 1x1 derivatives).
        assert has_barrier(texts["cpu"]), kind
        assert has_patches(texts["cpu"]) or kind == "eval" and arch == "resnet50", kind
        assert op_count(texts["cpu"], "convolution") < op_count(texts["cuda"], "convolution") or (
            kind == "eval" and arch == "resnet50")


def test_every_scoring_entry_point_takes_the_precision_keyword():
    # A bad value is refused by name before anything is traced, so each entry point is shown
    # to read the keyword (and to pass it on, for the streamed and NNX ones).
    from flax import nnx

    params = {"dense": {"kernel": jnp.ones((3, 2))}}
    batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros((4, 2))}

    def loss_fn(p, b):
        return jnp.mean((b["x"] @ p["dense"]["kernel"] - b["y"]) ** 2)

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

    def module_loss(m, b):
        return jnp.mean((m(b["x"]) - b["y"]) ** 2)

    calls = {
        "grasp_scores": lambda kw: gj.grasp_scores(params, loss_fn, batch, **kw),
        "grasp_abs_scores": lambda kw: gj.grasp_abs_scores(params, loss_fn, batch, **kw),
        "snip_scores": lambda kw: gj.snip_scores(params, loss_fn, batch, **kw),
        "gradient_and_hvp": lambda kw: gj.gradient_and_hvp(params, loss_fn, batch, **kw),
        "accumulate_gradient": lambda kw: gj.accumulate.accumulate_gradient(
            params, loss_fn, batch, **kw),
        "accumulate_hvp": lambda kw: gj.accumulate.accumulate_hvp(
            params, loss_fn, batch, params, **kw),
        "grasp_scores_from_batches": lambda kw: gj.grasp_scores_from_batches(
            params, loss_fn, lambda: [batch], **kw),
        "snip_scores_from_batches": lambda kw: gj.snip_scores_from_batches(
            params, loss_fn, lambda: [batch], **kw),
        "gradient_flow": lambda kw: gj.gradient_flow(params, loss_fn, batch, **kw),
        "nnx.grasp_scores": lambda kw: gj.nnx.grasp_scores(model, module_loss, batch, **kw),
        "nnx.snip_scores": lambda kw: gj.nnx.snip_scores(model, module_loss, batch, **kw),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="matmul_precision='fp32'"):
            call({"matmul_precision": "fp32"})
        assert call({"matmul_precision": None}) is not None, name
