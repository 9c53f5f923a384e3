"""The paper's ImageNet protocol, end to end on synthetic data in the real formats.

``python -m experiments.run --dataset imagenet2012`` with a torchvision-style bottleneck
ResNet (ResNet-50's layout at one block per stage: the protocol, not the depth, is under test)
and with torchvision's VGG-16 layout (no BatchNorm) at small widths, on a small imagenet2012
written as the manual download and prepared by TFDS's own builder
(tests/helpers/fake_datasets.py), at small images and smoke-sized scoring; Tiny-ImageNet from
its unpacked folder. ResNet-50 itself is checked abstractly (``jax.eval_shape``), without
running it, and VGG-16's parameter counts are pinned the same way in tests/models.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grasp_jax as gj
from grasp_jax import models

from experiments import data_scoring, streamed_scoring
from tests.helpers.fake_datasets import write_imagenet2012, write_tiny_imagenet
from tests.helpers.runs import REGISTER_TINY_RESNET, assert_refused, run_cli, run_in_process

OUTPUTS = {"config.json", "checkpoints", "metrics.jsonl", "tensorboard", "sparsity.md",
           "density.png", "masks.npz", "results.json", "gradient_flow.json",
           "sparse_params.npz"}


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    write_imagenet2012(root, num_validation=6, train_per_class=8)
    return root


def test_the_papers_chunk_layout():
    # pruner/GraSP_ImageNet.py: batches of 250 fed in chunks of 20.
    assert streamed_scoring.chunk_sizes(250, 20) == [20] * 12 + [10]
    assert streamed_scoring.describe_chunks(streamed_scoring.chunk_sizes(250, 20)) == \
        "12 x 20 + 1 x 10"
    assert streamed_scoring.chunk_sizes(128, 0) == [128]


@pytest.mark.slow
def test_only_the_last_dense_layer_is_redrawn_on_imagenet():
    # VGG16 for ImageNet has three Linear layers; pruner/GraSP_ImageNet.py redraws fc_layers[-1].
    model = models.VGGImageNet(cfg=(8, "M"), num_classes=5, hidden_widths=(32, 32))
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    order = models.layer_order(model, (32, 32, 3))
    last = data_scoring.reinit_dense_kernels(params, jax.random.PRNGKey(1), "last", order)
    every = data_scoring.reinit_dense_kernels(params, jax.random.PRNGKey(1), "all", order)
    for name in ("fc1", "fc2"):
        np.testing.assert_array_equal(last[name]["kernel"], params[name]["kernel"])
        assert not np.allclose(every[name]["kernel"], params[name]["kernel"])
    assert not np.allclose(last["fc3"]["kernel"], params["fc3"]["kernel"])
    np.testing.assert_array_equal(last["conv0"]["kernel"], params["conv0"]["kernel"])


def _imagenet_run(tmp_path, imagenet_dir, arch, extra=()):
    workdir = tmp_path / arch
    r = run_in_process([
        "--arch", arch, "--dataset", "imagenet2012", "--data_dir", str(imagenet_dir),
        "--image_size", "32", "--score_batches", "2", "--score_batch_size", "25",
        "--score_chunk_size", "10", "--batch_size", "8", "--max_steps", "3",
        "--epochs", "1", "--log_every_steps", "1", "--workdir", str(workdir), *extra])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    expected = OUTPUTS - ({"gradient_flow.json"} if "--no-gradient_flow" in extra else set())
    assert expected <= {p.name for p in workdir.iterdir()}
    results = json.loads((workdir / "results.json").read_text())
    assert results["status"] == "done" and results["steps"] == 3
    assert 0.0 <= results["final_test_accuracy"] <= 1.0
    masks = np.load(workdir / "masks.npz")
    total = sum(m.size for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert total - kept == int(np.floor(0.9 * total + 0.5))
    config = json.loads((workdir / "config.json").read_text())
    # The paper's preset, where the smoke flags did not override it.
    assert (config["lr_decay_factor"], config["weight_decay"]) == (0.1, 1e-4)
    assert config["score_reinit_layers"] == "last"
    return r, results


def _abstract_params(arch, image_size):
    model = models.get_model(arch, 1000)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]


def _prunable_count(params):
    leaves = jax.tree_util.tree_leaves(params)
    return sum(leaf.size for leaf, f in zip(leaves, gj.prunable.prunable_flags(params)) if f)


def test_resnet50_prunes_every_conv_and_fc_weight_of_torchvision_resnet50():
    params = _abstract_params("resnet50", 224)
    assert models.count_params(params) == 25_557_032  # torchvision's resnet50
    assert _prunable_count(params) == 25_502_912  # its conv + fc weights


@pytest.mark.slow
def test_bottleneck_resnet_on_imagenet_end_to_end(tmp_path, imagenet_dir, tiny_resnet):
    r, results = _imagenet_run(tmp_path, imagenet_dir, tiny_resnet)
    assert ("scoring with grasp on 2 batches of 25 training images, each in chunks of "
            "2 x 10 + 1 x 5, streamed in two passes") in r.stdout
    assert "last dense layer(s) re-drawn Xavier-normal" in r.stdout
    assert results["prunable_weights"] == _prunable_count(_abstract_params(tiny_resnet, 32))


@pytest.mark.slow
def test_bottleneck_resnet_scoring_streams_data_parallel_on_four_devices(
        tmp_path, imagenet_dir, tiny_resnet):
    one = tmp_path / "one"
    four = tmp_path / "four"
    args = ["--arch", tiny_resnet, "--dataset", "imagenet2012", "--data_dir", str(imagenet_dir),
            "--image_size", "32", "--score_batches", "3", "--score_batch_size", "25",
            "--score_chunk_size", "10", "--max_steps", "1", "--no-gradient_flow",
            "--method", "snip", "--sparsity", "0.5",
            # 6 images per device: the fake images are one colour per class, and
            # BatchNorm over two identical ones has zero variance (exploding steps).
            "--batch_size", "24"]
    r1 = run_in_process(args + ["--workdir", str(one)])
    r4 = run_cli(args + ["--workdir", str(four)], devices=4, prelude=REGISTER_TINY_RESNET)
    assert r1.returncode == 0 and r4.returncode == 0, r4.stdout[-2000:] + r4.stderr[-2000:]
    assert "data-parallel over 4 devices" in r4.stdout
    for r in (r1, r4):  # the short chunks of all three batches go out in the last group
        assert "scoring pass 1/1 (g): 3/3 batches" in r.stdout
    a, b = (dict(np.load(d / "masks.npz")) for d in (one, four))
    agree = sum(int(np.sum(a[k] == b[k])) for k in a) / sum(a[k].size for k in a)
    assert agree >= 0.9999


@pytest.mark.slow
def test_vgg_on_imagenet_end_to_end(tmp_path, imagenet_dir, tiny_vgg):
    # VGG-16's layout without BatchNorm at small widths (tests/models pins VGG-16's own
    # parameter counts, abstractly). SNIP: on these one-colour-per-class images GraSP's
    # masks make VGG-16 blow up at its first step (loss ~1e12), which the runner rightly
    # reports as diverged.
    r, results = _imagenet_run(tmp_path, imagenet_dir, tiny_vgg,
                               extra=("--method", "snip", "--no-gradient_flow"))
    assert "each in chunks of 2 x 10 + 1 x 5" in r.stdout
    params = _abstract_params(tiny_vgg, 32)
    assert {"fc1", "fc2", "fc3"} <= set(params) and "bn0" not in params
    assert results["prunable_weights"] == _prunable_count(params)


def test_impossible_scoring_flags_are_refused(capsys, tmp_path, imagenet_dir):
    base = ["--arch", "resnet50", "--dataset", "imagenet2012", "--data_dir", str(imagenet_dir),
            "--image_size", "32", "--workdir", str(tmp_path / "w")]
    assert_refused(capsys, base + ["--score_batch_size", "20", "--score_chunk_size", "25"],
             "--score_chunk_size 25", "larger than its batch")
    assert_refused(capsys, base + ["--score_batches", "0", "--score_draws", "0"], "no", "data")
    assert_refused(capsys, base + ["--image_size", "0"], "--image_size", "'0'")
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_tiny_imagenet_end_to_end_from_its_folder(tmp_path):
    root = tmp_path / "data"
    write_tiny_imagenet(root, per_class=6)
    workdir = tmp_path / "tiny"
    r = run_in_process(["--dataset", "tiny_imagenet", "--arch", "small_vgg", "--data_dir",
                        str(root / "tiny-imagenet-200"), "--method", "random",
                        "--batch_size", "6", "--max_steps", "2", "--workdir", str(workdir)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["status"] == "done" and results["steps"] == 2
    masks = np.load(workdir / "masks.npz")
    assert sum(m.size for m in masks.values()) > 2 * sum(int(m.sum()) for m in masks.values())
