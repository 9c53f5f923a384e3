"""experiments.methods: every criterion gives masks of exactly the requested sparsity."""

import jax
import numpy as np
import pytest

import grasp_jax as gj
from grasp_jax import data, models

from experiments import configs, data_scoring, methods, steps


@pytest.fixture(scope="module")
def lenet():
    model = models.get_model("lenet5", 10)
    return model, steps.init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))


# GraSP compiles a Hessian-vector product: the one method over ~10 s here.
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m == "grasp" else m
                                    for m in methods.names()])
def test_each_method_prunes_exactly(lenet, method):
    model, variables = lenet
    config = configs.resolve(dataset="digits", arch="lenet5", method=method, steps_per_epoch=11,
                             sparsity=0.8, rounds=3 if method == "synflow" else None)
    masks = methods.compute_masks(config, model, variables, jax.random.PRNGKey(1),
                                  data.get_info("digits"), log=lambda _: None)
    report = gj.sparsity_report(masks)
    expected = 0 if method == "dense" else int(np.floor(0.8 * report.total + 0.5))
    assert report.total - report.kept == expected


def test_scoring_batch_concatenates_draws_class_by_class():
    config = configs.resolve(dataset="digits", arch="lenet5", steps_per_epoch=11,
                             score_samples_per_class=2, score_draws=2)
    batch = data_scoring.scoring_batch(config, data.get_info("digits"))
    assert batch["image"].shape == (40, 8, 8, 1) and config.num_score_microbatches == 4
    # Each draw is ordered class by class, so each half of a draw holds 5 classes.
    np.testing.assert_array_equal(batch["label"], np.tile(np.repeat(np.arange(10), 2), 2))


def test_reinit_redraws_only_dense_kernels_xavier_normal(lenet):
    _, variables = lenet
    params = variables["params"]
    fc1 = {**params["fc1"], "kernel": params["fc1"]["kernel"].at[0, :5].set(0.0)}
    params = {**params, "fc1": fc1}
    out = data_scoring.reinit_dense_kernels(params, jax.random.PRNGKey(3))
    for name in ("conv1", "conv2"):  # convolutions and biases are the originals
        np.testing.assert_array_equal(out[name]["kernel"], params[name]["kernel"])
    np.testing.assert_array_equal(out["fc1"]["bias"], params["fc1"]["bias"])
    k = np.asarray(out["fc1"]["kernel"])
    assert np.all(k[0, :5] == 0) and np.all(k[1:] != 0)  # pruned weights stay pruned
    fan_in, fan_out = k.shape
    assert np.std(k[1:]) == pytest.approx(np.sqrt(2 / (fan_in + fan_out)), rel=0.05)
    assert not np.allclose(out["fc3"]["kernel"], params["fc3"]["kernel"])


def test_only_grasp_scores_a_reinitialized_copy_by_default():
    for method in methods.names():
        c = configs.resolve(dataset="cifar10", arch="vgg19", method=method, steps_per_epoch=1)
        # grasp_abs is GraSP's criterion with |·|, scored exactly as GraSP is.
        assert c.score_reinit_dense == (method in ("grasp", "grasp_abs"))


@pytest.mark.slow
def test_gradient_flow_report_compiles_once_and_ignores_running_averages():
    # small_vgg has BatchNorm; its running averages must not change a training-mode loss.
    model = models.get_model("small_vgg", 10)
    variables = steps.init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
    config = configs.resolve(dataset="digits", arch="small_vgg", method="magnitude",
                             steps_per_epoch=11, sparsity=0.8, batch_size=32)
    masks = methods.compute_masks(config, model, variables, jax.random.PRNGKey(1),
                                  data.get_info("digits"), log=lambda _: None)
    moved = {**variables, "batch_stats": jax.tree_util.tree_map(lambda s: s + 0.5,
                                                                 variables["batch_stats"])}
    before = gj.diagnostics._flow._cache_size()
    out = data_scoring.gradient_flow_report(config, data.get_info("digits"), model, variables,
                                            moved, masks, jax.random.PRNGKey(2),
                                            log=lambda _: None)
    assert gj.diagnostics._flow._cache_size() == before + 1  # one program for before and after
    # The same numbers as a loss built on the moved running averages.
    loss = data_scoring.make_loss_fn(model, moved["batch_stats"], 1.0, jax.random.PRNGKey(2))
    batch = data_scoring.diagnostics_batch(config, data.get_info("digits"))
    direct = gj.gradient_flow(moved["params"], loss, batch, masks=masks)
    assert out["after"] == pytest.approx(direct, rel=1e-6)
    assert out["after"]["grad_norm_sq"] < out["before"]["grad_norm_sq"]
