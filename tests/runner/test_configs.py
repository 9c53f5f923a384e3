"""Unit tests for experiments/: presets, schedule, optimizer semantics, the sparsity guard.

All in-process and fast; the CLI and whole runs are in test_run.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import jax_utils

import grasp_jax as gj

from experiments import config_schema, configs, steps


def _resolve(dataset, arch, method="grasp", steps_per_epoch=100, **kw):
    return configs.resolve(dataset=dataset, arch=arch, method=method,
                           steps_per_epoch=steps_per_epoch, **kw)


@pytest.mark.parametrize(
    "dataset, arch, epochs, wd, spc, draws, micro",
    [
        ("cifar10", "vgg19", 160, 5e-4, 10, 1, 2),
        ("cifar10", "resnet32", 160, 1e-4, 10, 1, 2),
        ("cifar100", "vgg19", 160, 5e-4, 10, 1, 2),
        ("cifar100", "resnet32", 160, 1e-4, 5, 2, 4),
        ("tiny_imagenet", "vgg19", 300, 5e-4, 1, 10, 20),
    ],
)
def test_paper_presets(dataset, arch, epochs, wd, spc, draws, micro):
    c = _resolve(dataset, arch)
    assert (c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay) == (epochs, 128, 0.1, 0.9, wd)
    assert c.lr_decay_epochs == (epochs // 2, epochs * 3 // 4)
    got = (c.score_samples_per_class, c.score_draws, c.num_score_microbatches)
    assert got == (spc, draws, micro)
    assert c.temperature == 200 and c.rounds == 1


def test_imagenet_preset():
    # The paper's ImageNet protocol: 150 epochs, lr / 10 at 50 and 100,
    # scored on 150 batches of 250 in chunks of 20 (12 x 20 + 10 per batch).
    c = _resolve("imagenet2012", "resnet50")
    assert (c.epochs, c.batch_size, c.lr, c.weight_decay) == (150, 256, 0.1, 1e-4)
    assert c.lr_decay_epochs == (50, 100)
    assert (c.score_batches, c.score_batch_size, c.score_chunk_size) == (150, 250, 20)
    assert c.num_score_microbatches == 150 * 13
    assert c.score_reinit_dense and c.score_reinit_layers == "last"


def test_overrides_linear_lr_scaling_and_method_defaults():
    assert _resolve("cifar10", "vgg19", batch_size=64).lr == pytest.approx(0.05)
    assert _resolve("cifar10", "vgg19", batch_size=64, lr=0.3).lr == 0.3
    assert _resolve("cifar10", "vgg19", epochs=10).lr_decay_epochs == (5, 7.5)


def test_short_schedules_decay_at_half_and_three_quarters_not_at_step_zero():
    # int(epochs * 0.5) would be 0 for one epoch: lr/100 from the first step.
    c = _resolve("cifar10", "vgg19", epochs=1)
    assert c.lr_decay_epochs == (0.5, 0.75)
    assert config_schema.lr_boundaries(c) == {50: 0.1, 75: 0.1}  # 100 steps per epoch
    two_epochs = _resolve("cifar10", "vgg19", epochs=2)
    assert config_schema.lr_boundaries(two_epochs) == {100: 0.1, 150: 0.1}
    syn = _resolve("cifar10", "vgg19", method="synflow")
    assert (syn.rounds, syn.temperature) == (100, 1.0)
    assert _resolve("cifar10", "vgg19", method="dense", sparsity=0.5).sparsity == 0.0


def test_config_roundtrip_and_differences():
    c = _resolve("digits", None, max_steps=5)
    assert config_schema.Config.from_dict(c.to_dict()) == c
    # Run-control fields do not make a different run; anything else does.
    same = _resolve("digits", None, max_steps=500, checkpoint_every_steps=3, data_dir="/x")
    assert config_schema.differences(c, same) == []
    other = _resolve("digits", None, sparsity=0.5)
    assert [d[0] for d in config_schema.differences(c, other)] == ["sparsity"]


def test_lr_schedule_decays_from_the_first_step_of_the_decay_epoch():
    c = _resolve("cifar10", "vgg19", steps_per_epoch=10, epochs=4)  # decay at epochs 2 and 3
    lr = steps.learning_rate_schedule(c)
    # optax counts updates from 0: update k is step k+1 of the run; epoch 2 starts at update 20.
    got = [float(lr(k)) for k in (0, 19, 20, 29, 30, 39)]
    np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_optimizer_is_pytorch_sgd_with_masks():
    """p <- p - lr * buf,  buf <- m * buf + (g + wd * p), and masked weights stay 0."""
    c = _resolve("cifar10", "vgg19", steps_per_epoch=1000, weight_decay=0.01, lr=0.5)
    params = {"w": {"kernel": jnp.array([[1.0, -2.0], [3.0, 0.5]])}}
    masks = {"w": {"kernel": jnp.array([[True, False], [True, True]])}}
    tx = steps.make_optimizer(c, masks)
    state = steps.create_state({"params": params, "batch_stats": {}}, masks, tx,
                               jax.random.PRNGKey(0))
    p, opt = state.params, state.opt_state
    ref_p = np.where(masks["w"]["kernel"], params["w"]["kernel"], 0.0)
    buf = np.zeros_like(ref_p)
    for k in range(3):
        g = {"w": {"kernel": jnp.full((2, 2), 0.1 * (k + 1))}}
        updates, opt = tx.update(g, opt, p)
        p = optax.apply_updates(p, updates)
        d = np.asarray(g["w"]["kernel"]) + 0.01 * ref_p
        buf = 0.9 * buf + d
        ref_p = np.where(masks["w"]["kernel"], ref_p - 0.5 * buf, ref_p)
    np.testing.assert_allclose(p["w"]["kernel"], ref_p, rtol=1e-6)
    assert p["w"]["kernel"][0, 1] == 0.0


def test_guard_names_the_leaf_whose_pruned_weights_moved():
    params = {"a": {"kernel": jnp.zeros((2, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
    masks = {"a": {"kernel": jnp.zeros((2, 2), bool)}, "b": {"kernel": jnp.ones((2, 2), bool)}}
    steps.check_pruned_weights_are_zero(params, masks)  # fine
    params["a"]["kernel"] = params["a"]["kernel"].at[0, 0].set(1e-30)
    with pytest.raises(steps.SparsityDriftError, match=r"a/kernel \(1 weights\)"):
        steps.check_pruned_weights_are_zero(params, masks)


def test_train_step_keeps_pruned_weights_zero_under_pmap():
    from grasp_jax import models

    model = models.get_model("small_vgg", 10)
    c = _resolve("cifar10", "small_vgg", steps_per_epoch=10, batch_size=8)
    variables = steps.init_variables(model, jax.random.PRNGKey(0), (8, 8, 3))
    masks = gj.masks_from_scores(gj.magnitude_scores(variables["params"]), 0.8, direction="lowest")
    tx = steps.make_optimizer(c, masks)
    state = steps.create_state(variables, masks, tx, jax.random.PRNGKey(1))
    rstate = jax_utils.replicate(state, axis_name=steps.AXIS)
    step = steps.make_train_step(model, tx)
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = {"image": rng.normal(size=(1, 8, 8, 8, 3)).astype(np.float32),
                 "label": rng.integers(0, 10, size=(1, 8)).astype(np.int32)}
        rstate, metrics = step(rstate, batch)
    host = jax.tree_util.tree_map(lambda x: np.asarray(x[0]), rstate.as_dict())
    assert int(host["step"]) == 3 and np.isfinite(metrics["loss"]).all()
    steps.check_pruned_weights_are_zero(host["params"], host["masks"])
    # BatchNorm running statistics moved away from their init.
    assert not np.allclose(host["batch_stats"]["bn0"]["mean"], 0.0)


def test_evaluation_waits_for_each_step_before_the_next(monkeypatch):
    """Eval steps are independent of each other, so JAX would run several at once; with several
    XLA:CPU devices their all-reduces then deadlocked (see steps.evaluate)."""
    events = []

    def p_eval(state, batch):
        events.append(f"step {batch}")
        return {k: jnp.full((1,), v) for k, v in (("loss", 2.0), ("correct", 1.0),
                                                  ("count", 4.0))}

    real_wait = jax.block_until_ready
    monkeypatch.setattr(steps.jax, "block_until_ready",
                        lambda x: (events.append("wait"), real_wait(x))[1])
    metrics = steps.evaluate(p_eval, None, iter(range(3)))
    assert events == ["step 0", "wait", "step 1", "wait", "step 2"]
    assert metrics == {"test/loss": 0.5, "test/accuracy": 0.25}


def test_pruning_polls_for_a_stop_only_where_it_loops():
    import jax

    from grasp_jax import data, models

    from experiments import methods, steps

    model = models.get_model("lenet5", 10)
    variables = steps.init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
    for rounds, polls in ((1, 0), (3, 2)):  # between rounds, never after the last one
        calls = []
        config = _resolve("digits", "lenet5", method="magnitude", sparsity=0.5, rounds=rounds)
        methods.compute_masks(config, model, variables, jax.random.PRNGKey(1),
                              data.get_info("digits"), log=lambda _: None,
                              stop_requested=lambda c=calls: c.append(1) or False)
        assert len(calls) == polls


def test_a_poller_promises_its_stop_from_its_first_poll():
    import signal

    from experiments.signals import StopSignals

    signals = StopSignals()
    with signals.polled("stopping after this batch") as poll:
        assert signals.response == StopSignals.SAVING  # nothing polled yet: the run's answer
        assert poll() is False
        assert signals.response == "stopping after this batch"
        signals.signum = signal.SIGINT
        assert poll() is True
    assert signals.response == StopSignals.SAVING
