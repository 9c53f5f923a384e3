"""The toolkit's choices as run settings: N:M masks, per-layer budgets,
a seeded random tie-break and BatchNorm's mode while scoring, through
``experiments.methods.compute_masks``."""

import jax
import numpy as np
import pytest

import grasp_jax as gj
from grasp_jax import data, models

from experiments import config_schema, configs, methods, steps


@pytest.fixture(scope="module")
def small_vgg():
    model = models.get_model("small_vgg", 10)
    return model, steps.init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))


def _masks(model_vars, **overrides):
    model, variables = model_vars
    config = configs.resolve(dataset="digits", arch="small_vgg", steps_per_epoch=11,
                             **overrides)
    configs.validate(config)
    lines = []
    masks = methods.compute_masks(config, model, variables, jax.random.PRNGKey(1),
                                  data.get_info("digits"), log=lines.append)
    return config, masks, lines


def test_nm_masks_keep_two_of_every_four_input_weights(small_vgg):
    config, masks, _ = _masks(small_vgg, method="magnitude", nm="2:4")
    assert config.sparsity == 0.5
    kernel = np.asarray(masks["conv1"]["kernel"])  # (3, 3, 16, 32): groups along the input axis
    groups = kernel.reshape(3, 3, 4, 4, 32).sum(axis=3)
    assert np.all(groups == 2)


def test_nm_is_one_shot_and_global_only():
    config = configs.resolve(dataset="digits", arch="small_vgg", steps_per_epoch=11,
                             method="synflow", nm="2:4")
    with pytest.raises(config_schema.UsageError, match="--nm 2:4 is one-shot"):
        configs.validate(config)
    with pytest.raises(config_schema.UsageError, match="N:M"):
        configs.validate(configs.resolve(dataset="digits", arch="small_vgg",
                                         steps_per_epoch=11, nm="4:2"))


def test_erk_budgets_give_the_exact_count_and_denser_small_layers(small_vgg):
    _, masks, _ = _masks(small_vgg, method="magnitude", sparsity=0.8, scope="erk")
    report = gj.sparsity_report(masks)
    assert report.total - report.kept == int(np.floor(0.8 * report.total + 0.5))
    density = {layer.name: layer.density for layer in report.layers}
    assert density["conv0/kernel"] > density["conv2/kernel"]  # ERK: fewer weights, denser


def test_random_tie_break_is_seeded_and_differs_from_positional(small_vgg):
    model, variables = small_vgg
    zeroed = {**variables, "params": jax.tree_util.tree_map(np.zeros_like, variables["params"])}
    runs = [_masks((model, zeroed), method="magnitude", sparsity=0.5, scope="layerwise",
                   tie_break=t) for t in ("position", "random", "random")]
    (_, pos, lines), (_, rnd1, _), (_, rnd2, _) = runs
    assert any("tie" in line for line in lines)  # the TieWarning went into the run's log
    leaves = lambda m: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(m)])
    np.testing.assert_array_equal(leaves(rnd1), leaves(rnd2))
    assert np.any(leaves(rnd1) != leaves(pos))


def test_batchnorm_eval_mode_scores_differently_from_train_mode(small_vgg):
    _, train_masks, lines = _masks(small_vgg, method="snip", sparsity=0.9, scope="layerwise")
    _, eval_masks, eval_lines = _masks(small_vgg, method="snip", sparsity=0.9,
                                       scope="layerwise", score_bn_mode="eval")
    assert any("BatchNorm train mode" in line for line in lines)
    assert any("BatchNorm eval mode" in line for line in eval_lines)
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(m)])
            for m in (train_masks, eval_masks))
    assert a.sum() == b.sum() and np.mean(a != b) > 0.01
