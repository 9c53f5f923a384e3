"""A criterion added through the method registry alone runs end to end: one ``register``
call in a plugin module named in $GRASP_JAX_PLUGINS makes it a ``--method`` of the runner."""

import json
import sys
import textwrap

import chex
import numpy as np
import pytest

import grasp_jax as gj

from experiments import methods, presets
from tests.helpers.paths import REPO
from tests.helpers.runs import run_in_process

TOY = textwrap.dedent('''
    """A toy data-free criterion: a core entry, a runner entry and its score function."""
    import jax
    import jax.numpy as jnp

    import grasp_jax as gj
    from experiments import methods


    def squared_scores(params):
        return jax.tree_util.tree_map(lambda x: jnp.square(x), params)


    gj.criteria.register(gj.criteria.Criterion("toy_squared", "lowest", "none"))
    methods.register(methods.Method(
        name="toy_squared", criterion="toy_squared", summary="θ²",
        build=lambda ctx: squared_scores, preset={"rounds": 2}))
''')


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    """TOY as a module named in $GRASP_JAX_PLUGINS; its entry is gone from the registry after."""
    (tmp_path / "toy_method.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("GRASP_JAX_PLUGINS", "toy_method")
    monkeypatch.setattr(methods, "REGISTRY", dict(methods.REGISTRY))
    yield
    sys.modules.pop("toy_method", None)


@pytest.mark.slow
def test_a_registered_toy_criterion_runs_end_to_end(tmp_path, toy_plugin):
    workdir = tmp_path / "w"
    r = run_in_process(["--dataset", "digits", "--arch", "lenet5", "--method", "toy_squared",
                        "--sparsity", "0.5", "--scope", "layerwise",
                        "--batch_size", "32", "--max_steps", "3", "--workdir", str(workdir)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "round 2/2" in r.stdout  # the entry's own preset (2 rounds) was applied
    results = json.loads((workdir / "results.json").read_text())
    assert results["method"] == "toy_squared" and results["status"] == "done"
    masks = np.load(workdir / "masks.npz")
    total = sum(m.size for m in masks.values())
    assert total - sum(int(m.sum()) for m in masks.values()) == int(np.floor(0.5 * total + 0.5))
    # The trained network as a sparse artifact, equal to the final checkpoint's params.
    import grasp_jax as gj

    from experiments import checkpointing

    _, state = checkpointing.load_state(str(workdir))
    sparse = gj.load_sparse(workdir / "sparse_params.npz")
    chex.assert_trees_all_equal(sparse, state["params"])
    assert results["sparse_params_bytes"] == (workdir / "sparse_params.npz").stat().st_size


def test_the_cli_choices_and_presets_come_from_the_registry():
    from experiments import run_config

    method_action = next(a for a in run_config.build_parser()._actions if a.dest == "method")
    assert tuple(method_action.choices) == methods.names()
    for m in methods.REGISTRY.values():
        p = presets.preset("cifar10", "vgg19", m.name)
        assert all(p[k] == v for k, v in m.preset.items())
    assert "| `grasp` |" in methods.markdown_table()


def test_the_schema_takes_the_method_choices_from_its_caller():
    import argparse
    import dataclasses

    from experiments import cli, config_schema

    (method,) = [f for f in config_schema.flag_fields() if f.name == "method"]
    assert config_schema.field_choices(method, {"method": ("a", "b")}) == ("a", "b")
    with pytest.raises(LookupError, match="--method takes its choices from a registry"):
        config_schema.field_choices(method)
    parser = argparse.ArgumentParser()
    cli.add_fields(parser, config_schema.flag_fields(), registered={"method": ("a", "b")})
    assert parser.parse_args(["--method", "b"]).method == "b"
    (scope,) = [f for f in dataclasses.fields(config_schema.Config) if f.name == "scope"]
    assert config_schema.field_choices(scope) == gj.budgets.SCOPES  # its own, not the caller's


def test_a_method_registered_after_import_is_a_choice_of_the_next_parser(monkeypatch):
    from experiments import configs, run_config
    from experiments.config_schema import UsageError

    monkeypatch.setattr(methods, "REGISTRY", dict(methods.REGISTRY))
    before = run_config.build_parser()
    methods.register(methods.Method("magnitude_again", "magnitude", "|θ|",
                                    lambda ctx: gj.magnitude_scores))
    args = run_config.build_parser().parse_args(["--method", "magnitude_again"])
    assert args.method == "magnitude_again"
    with pytest.raises(UsageError, match="invalid choice: 'magnitude_again'"):
        before.parse_args(["--method", "magnitude_again"])
    config = configs.resolve(dataset="digits", arch="lenet5", method="magnitude_again",
                             steps_per_epoch=1)
    configs.validate(config)
    monkeypatch.setattr(methods, "REGISTRY", {k: v for k, v in methods.REGISTRY.items()
                                              if k != "magnitude_again"})
    with pytest.raises(UsageError, match="--method 'magnitude_again': not one of"):
        configs.validate(config)


def test_a_taken_name_or_a_bad_direction_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.Method("grasp", "grasp", "again", build=lambda ctx: None))
    with pytest.raises(ValueError, match="not in grasp_jax.criteria.CRITERIA"):
        methods.register(methods.Method("sideways", "sideways", "?", build=lambda ctx: None))
    with pytest.raises(ValueError, match="needs a build"):
        methods.register(methods.Method("bare_magnitude", "magnitude", "|θ| again"))
    with pytest.raises(ValueError, match="direction"):
        gj.criteria.Criterion("sideways", "middle", "gradient", lambda p, g, hg, f: g)
    with pytest.raises(ValueError, match="already registered"):
        gj.criteria.register(gj.criteria.Criterion("snip", "lowest", "gradient",
                                                   gj.criteria.snip_from_sums))
    assert "sideways" not in methods.REGISTRY and "bare_magnitude" not in methods.REGISTRY


def test_a_method_takes_its_direction_and_data_needs_from_the_core_criterion():
    for m in methods.REGISTRY.values():
        if m.prunes:
            core = gj.criteria.CRITERIA[m.criterion]
            assert m.direction == core.direction == gj.criteria.PRUNE_DIRECTION[m.criterion]
            assert m.needs_data == (core.needs != "none")
    assert methods.get("grasp").needs_data and not methods.get("synflow").needs_data
    assert methods.get("dense").direction is None


def test_the_readme_method_table_is_the_registrys():
    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- methods-table")
    table = readme[readme.index("\n", start) + 1:readme.index("<!-- end methods-table")]
    assert table.strip() == methods.markdown_table()
