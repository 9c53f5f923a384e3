"""``--compute_dtype``: bfloat16 training with float32 parameters, optimizer state,
BatchNorm statistics, masks, loss and scoring; float16 refused.

The step-level test checks dtypes directly; the whole runs check that bfloat16
trains as well as float32, prunes the same weights, keeps them at exactly 0
and resumes bit for bit.
"""

import json
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import jax_utils

import grasp_jax as gj
from grasp_jax import models

from experiments import checkpointing, config_schema, configs, run, run_config, steps
from tests.helpers.paths import SHARED_TFDS as TFDS_DIR
from tests.helpers.runs import assert_refused, run_in_process


def _floating_dtypes(tree):
    return {str(x.dtype) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)}


# --------------------------------------------------------------------------
# Flags and config.


@pytest.mark.parametrize("value, needles", [
    ("float16", ["--compute_dtype", "'float16'", "loss scaling", "not implemented"]),
    ("float64", ["--compute_dtype", "'float64'", "float32 or bfloat16"]),
])
def test_other_compute_dtypes_are_refused_at_parse_time(capsys, tmp_path, value, needles):
    workdir = tmp_path / "w"
    assert_refused(capsys, ["--dataset", "digits", "--compute_dtype", value,
                      "--workdir", str(workdir)], *needles)
    assert not workdir.exists()


def test_a_saved_config_records_the_compute_dtype_and_old_ones_read_as_float32():
    config = run_config.parse_config(["--dataset", "digits", "--compute_dtype", "bfloat16"])
    assert config.compute_dtype == "bfloat16"
    assert json.loads(config.to_json())["compute_dtype"] == "bfloat16"
    assert run_config.parse_config(["--dataset", "digits"]).compute_dtype == "float32"
    # A workdir written before the setting existed holds the paper's float32 run.
    old = {k: v for k, v in config.to_dict().items() if k != "compute_dtype"}
    assert config_schema.Config.from_dict(old).compute_dtype == "float32"
    # Resuming a run in the other dtype would change its trajectory: it is a difference.
    assert ("compute_dtype", "float32", "bfloat16") in config_schema.differences(
        config_schema.Config.from_dict(old), config)
    with pytest.raises(config_schema.UsageError, match="loss scaling"):
        configs.validate(config_schema.Config.from_dict({**old, "compute_dtype": "float16"}))


# --------------------------------------------------------------------------
# The train step.


def _one_step(compute_dtype):
    """A small BatchNorm VGG after two bfloat16 or float32 train steps on 8x8 digits-like
    images, half its weights pruned: (config, state before, state after, losses)."""
    config = configs.resolve(dataset="digits", arch="small_vgg", steps_per_epoch=11,
                             compute_dtype=compute_dtype)
    configs.validate(config)
    scoring_model = models.get_model("small_vgg", 10)
    variables = steps.init_variables(scoring_model, jax.random.PRNGKey(0), (8, 8, 1))
    masks = gj.masks_from_scores(gj.random_scores(variables["params"], jax.random.PRNGKey(1)),
                                 0.5, criterion="random")
    tx = steps.make_optimizer(config, masks)
    state = steps.create_state(variables, masks, tx, jax.random.PRNGKey(2))
    p_train = steps.make_train_step(steps.training_model(config, 10), tx)
    rstate = jax_utils.replicate(state, axis_name=steps.AXIS)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(1, 32, 8, 8, 1)).astype(np.float32),
             "label": rng.integers(0, 10, size=(1, 32)).astype(np.int32)}
    losses = []
    for _ in range(2):
        rstate, metrics = p_train(rstate, batch)
        losses.append(float(metrics["loss"][0]))
    return config, state, jax_utils.unreplicate(rstate), losses


@pytest.mark.slow
def test_bfloat16_steps_compute_in_bfloat16_and_keep_everything_else_float32():
    config, before, after, bf16_losses = _one_step("bfloat16")
    # The network the steps run computes in bfloat16: its layers' outputs are bfloat16 ...
    model = steps.training_model(config, 10)
    _, captured = model.apply({"params": after.params, "batch_stats": after.batch_stats},
                              jnp.zeros((2, 8, 8, 1)), train=False,
                              capture_intermediates=True)
    inner = {k: v for k, v in captured["intermediates"].items() if k.startswith(("conv", "bn"))}
    assert inner and _floating_dtypes(inner) == {"bfloat16"}
    # ... and everything it keeps is float32; the masks are boolean.
    for name in ("params", "opt_state", "batch_stats"):
        assert _floating_dtypes(getattr(after, name)) == {"float32"}, name
    assert {x.dtype for x in jax.tree_util.tree_leaves(after.masks)} == {np.dtype(bool)}
    # BatchNorm statistics moved (the steps ran), and pruned weights are still exactly 0.
    assert not np.allclose(before.batch_stats["bn0"]["mean"], after.batch_stats["bn0"]["mean"])
    steps.check_pruned_weights_are_zero(after.params, after.masks)
    assert steps.prunable_zero_fraction(after.params) >= 0.5
    # Same start, same data: bfloat16 rounds, so the losses differ from float32's, but little.
    _, _, _, f32_losses = _one_step("float32")
    assert bf16_losses != f32_losses
    np.testing.assert_allclose(bf16_losses, f32_losses, rtol=2e-2)


def test_the_loss_is_taken_in_float32_from_bfloat16_logits():
    logits = jnp.asarray([[3.0, 1.0, 0.2]], jnp.bfloat16)
    loss = steps.cross_entropy(logits, jnp.asarray([1]))
    assert loss.dtype == jnp.float32
    expected = -jax.nn.log_softmax(logits.astype(jnp.float32))[0, 1]
    np.testing.assert_allclose(loss[0], expected, rtol=1e-6)


# --------------------------------------------------------------------------
# Whole runs.


def _run_in_process(workdir, args):
    assert run.main(args + ["--workdir", str(workdir), "--compilation_cache", "none"]) == 0
    return json.loads((workdir / "results.json").read_text())


@pytest.mark.slow
def test_bfloat16_digits_run_matches_float32_accuracy_masks_and_sparsity(tmp_path):
    # Long enough (16 epochs, two lr decays) that both runs converge: at lr 0.05 the test
    # accuracy still swings by points from epoch to epoch before the decays. LeNet-300-100
    # (mlp) settles more reliably than LeNet-5 on the 360 test images, where a point is
    # 3.6 images.
    args = ["--dataset", "digits", "--arch", "mlp", "--method", "grasp", "--sparsity", "0.5",
            "--batch_size", "64", "--lr", "0.05", "--epochs", "16", "--log_every_steps", "50",
            "--no-gradient_flow"]
    f32 = _run_in_process(tmp_path / "f32", args)
    bf16 = _run_in_process(tmp_path / "bf16", args + ["--compute_dtype", "bfloat16"])
    assert (f32["compute_dtype"], bf16["compute_dtype"]) == ("float32", "bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["compute_dtype"] == \
        "bfloat16"
    assert f32["final_test_accuracy"] > 0.9
    assert abs(bf16["final_test_accuracy"] - f32["final_test_accuracy"]) <= 0.01, (f32, bf16)
    # Scoring ran the float32 network in both: GraSP chose the same weights.
    masks = [np.load(tmp_path / d / "masks.npz") for d in ("f32", "bf16")]
    assert masks[0].files == masks[1].files
    for name in masks[0].files:
        np.testing.assert_array_equal(masks[0][name], masks[1][name], err_msg=name)
    # Pruned weights are exactly 0 after training, and what is kept is float32.
    assert bf16["prunable_zero_fraction"] >= bf16["sparsity_reached"]
    _, state = checkpointing.load_state(str(tmp_path / "bf16"))
    steps.check_pruned_weights_are_zero(state["params"], state["masks"])
    for name in ("params", "opt_state", "batch_stats"):
        assert _floating_dtypes(state[name]) <= {"float32"}, name
    assert _floating_dtypes(state["params"]) == {"float32"}


@pytest.mark.slow
def test_a_stopped_bfloat16_run_resumes_to_the_same_parameters(tmp_path):
    # small_vgg has BatchNorm, so bfloat16 running statistics must survive the restart too.
    args = ["--dataset", "digits", "--arch", "small_vgg", "--batch_size", "32", "--method",
            "random", "--sparsity", "0.5", "--max_steps", "20", "--checkpoint_every_steps", "10",
            "--log_every_steps", "5", "--compute_dtype", "bfloat16"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    r = run_in_process(args + ["--workdir", str(straight)])
    assert r.returncode == 0, r.stderr[-3000:]
    # Step 7 is between checkpoints: the stop itself saves the one the rerun resumes from.
    r = run_in_process(args + ["--workdir", str(broken)], signal_at=(7, signal.SIGTERM))
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    assert "SIGTERM: saved a checkpoint at step 7" in r.stdout
    r = run_in_process(args + ["--workdir", str(broken)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from step 7" in r.stdout
    (s1, a), (s2, b) = (checkpointing.load_state(str(d)) for d in (straight, broken))
    assert s1 == s2 == 20
    chex.assert_trees_all_equal(a, b)
    assert _floating_dtypes(a["params"]) == {"float32"}


@pytest.mark.slow
@pytest.mark.skipif(not TFDS_DIR.is_dir(), reason="needs the CIFAR-10 copy in ../shared/tfds")
def test_bfloat16_cifar10_run_is_within_a_point_of_float32(tmp_path):
    # One epoch with its two lr decays (at 50% and 75% of it), so both runs settle.
    args = ["--dataset", "cifar10", "--arch", "small_vgg", "--method", "random", "--sparsity",
            "0.5", "--epochs", "1", "--log_every_steps", "100", "--no-gradient_flow",
            "--data_dir", str(TFDS_DIR)]
    f32 = _run_in_process(tmp_path / "f32", args)
    bf16 = _run_in_process(tmp_path / "bf16", args + ["--compute_dtype", "bfloat16"])
    assert f32["final_test_accuracy"] > 0.3
    assert abs(bf16["final_test_accuracy"] - f32["final_test_accuracy"]) <= 0.01, (f32, bf16)
