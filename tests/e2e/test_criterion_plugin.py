"""A data-dependent criterion a user adds (one core entry, one runner registry line)
scores streamed, on one device and on four, exactly as the core scores it directly."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grasp_jax as gj
from grasp_jax import data

from tests.helpers.runs import run_in_process

REPO = Path(__file__).resolve().parents[2]

# θ² · |g| + |θ ⊙ Hg|: needs g and Hg, so the runner streams two passes.
PLUGIN = textwrap.dedent('''
    """A user's criterion: one core entry and one runner registry line."""
    import jax
    import jax.numpy as jnp

    import grasp_jax as gj
    from experiments import methods


    def toy_from_sums(params, g, hg, flags):
        first = gj.criteria.theta_map(lambda t, v: t * t * jnp.abs(v), params, g, flags)
        second = gj.criteria.theta_map(lambda t, v: jnp.abs(t * v), params, hg, flags)
        return jax.tree_util.tree_map(jnp.add, first, second)


    TOY = gj.criteria.register(gj.criteria.Criterion("toy_flow", "lowest", "hvp", toy_from_sums))
    methods.register(methods.Method("toy_flow", "toy_flow", "θ²·|g| + |θ ⊙ Hg|"))
''')

# Three batches of 20 in chunks of 10: six chunks, dealt over four devices with padding.
ARGS = ["--dataset", "digits", "--arch", "lenet5", "--method", "toy_flow", "--sparsity", "0.7",
        "--score_batches", "3", "--score_batch_size", "20", "--score_chunk_size", "10",
        "--temperature", "1", "--no-score_reinit_dense", "--batch_size", "32", "--max_steps", "1",
        "--no-gradient_flow"]


def _run_on_four_devices(tmp_path: Path, workdir: Path) -> subprocess.CompletedProcess:
    """The run in a fresh process with four CPU devices (a device count is fixed when JAX
    starts), which imports the plugin named in $GRASP_JAX_PLUGINS."""
    env = dict(os.environ, GRASP_JAX_PLUGINS="toy_plugin", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "experiments.run", *ARGS,
                           "--num_cpu_devices", "4", "--workdir", str(workdir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture
def plugin_registries():
    """The criterion and method registries as they were before the test, afterwards: the
    plugin registers toy_flow in this process too."""
    from experiments import methods

    registries = (gj.criteria._CRITERIA, methods.REGISTRY)
    saved = [dict(r) for r in registries]
    yield
    for registry, before in zip(registries, saved):
        registry.clear()
        registry.update(before)
    sys.modules.pop("toy_plugin", None)


def _direct_masks(config) -> dict:
    """The masks of ``scores(toy, ...)`` on the same batches, in the same chunks, from the
    run's own network, keys and loss, without the runner's scoring."""
    from experiments import data_scoring, steps

    info = data.get_info(config.dataset)
    model = steps.training_model(config, info.num_classes)
    init_key, score_key, _ = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    variables = steps.init_variables(model, init_key, info.image_shape)
    stream = data.scoring_stream(info, config.score_batches, config.score_batch_size,
                                 seed=config.seed)
    batches = list(stream())
    batch = {k: np.concatenate([b[k] for b in batches]) for k in ("image", "label")}
    loss_fn = data_scoring.make_loss_fn(model, variables.get("batch_stats", {}),
                                        config.temperature, score_key, config.score_bn_mode)
    scores = gj.scores("toy_flow", variables["params"], loss_fn, batch,
                       microbatch_size=config.score_chunk_size)
    assert config.rounds == 1 and config.tie_break == "position"
    masks = gj.prune(variables["params"], lambda _: scores, config.sparsity,
                     direction=gj.criteria.CRITERIA["toy_flow"].direction, scope=config.scope,
                     rounds=config.rounds, schedule=config.prune_schedule)
    flags = gj.prunable.prunable_flags(masks)
    return scores, [(n, m) for (n, m), f in zip(gj.prunable.named_leaves(masks), flags) if f]


@pytest.mark.slow
def test_a_plugin_criterion_streams_on_one_and_four_devices_as_scored_directly(
        tmp_path, monkeypatch, plugin_registries):
    (tmp_path / "toy_plugin.py").write_text(PLUGIN)
    runs = {}
    for devices in (1, 4):
        workdir = tmp_path / f"d{devices}"
        if devices == 1:  # in this process, which imports the plugin as a fresh one would
            monkeypatch.setenv("GRASP_JAX_PLUGINS", "toy_plugin")
            monkeypatch.syspath_prepend(str(tmp_path))
            r = run_in_process([*ARGS, "--workdir", str(workdir)])
        else:
            r = _run_on_four_devices(tmp_path, workdir)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert ("scoring with toy_flow on 3 batches of 20 training images, each in chunks of "
                "2 x 10, streamed in two passes") in r.stdout
        assert ("data-parallel over 4 devices" in r.stdout) == (devices == 4)
        runs[devices] = dict(np.load(workdir / "masks.npz"))
    config_dict = json.loads((tmp_path / "d1" / "config.json").read_text())
    assert "toy_flow" in gj.criteria.CRITERIA  # the one-device run imported the plugin here
    from experiments import config_schema

    config = config_schema.Config.from_dict(config_dict)
    scores, want = _direct_masks(config)
    assert sum(float(jnp.sum(jnp.abs(s))) for s in jax.tree_util.tree_leaves(scores)) > 0
    for devices, got in runs.items():
        assert set(got) == {name for name, _ in want}, devices
        for name, mask in want:
            np.testing.assert_array_equal(got[name], np.asarray(mask), err_msg=f"{devices}: {name}")
