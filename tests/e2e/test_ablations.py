"""The runner's sanity-check ablations and gradient-flow diagnostics, end to end on digits."""

import json

import numpy as np
import pytest

from tests.helpers.runs import run_in_process

ARGS = ["--dataset", "digits", "--arch", "lenet5", "--method", "snip", "--sparsity", "0.9",
        "--max_steps", "2", "--batch_size", "32",
        # invert keeps what SNIP would prune first: whole layers, by design of the check.
        "--allow_layer_collapse"]


def _run(tmp_path, ablation):
    workdir = tmp_path / ablation
    proc = run_in_process([*ARGS, "--ablation", ablation, "--workdir", str(workdir)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    masks = dict(np.load(workdir / "masks.npz"))
    return results, masks


@pytest.mark.slow
def test_ablations_and_gradient_flow(tmp_path):
    base, base_masks = _run(tmp_path, "none")
    flow = base["gradient_flow"]
    assert base["ablation"] == "none"
    for when in ("before", "after"):
        assert set(flow[when]) == {"loss", "grad_norm_sq", "gHg"}
        assert all(np.isfinite(v) for v in flow[when].values())
    # Pruning 90% of the kernels removes gradient flow.
    assert flow["after"]["grad_norm_sq"] < flow["before"]["grad_norm_sq"]

    shuffled, shuffled_masks = _run(tmp_path, "shuffle")
    inverted, inverted_masks = _run(tmp_path, "invert")
    reinit, reinit_masks = _run(tmp_path, "reinit")
    prunable = [k for k, m in base_masks.items() if m.ndim >= 2]
    assert prunable
    for k in prunable:
        # shuffle: same count per layer, other positions
        assert shuffled_masks[k].sum() == base_masks[k].sum()
        # reinit: the very same masks
        np.testing.assert_array_equal(reinit_masks[k], base_masks[k])
    assert any(np.any(shuffled_masks[k] != base_masks[k]) for k in prunable)
    # invert: the same number kept overall, none of the same weights at 90%
    kept = [sum(int(m[k].sum()) for k in prunable) for m in (inverted_masks, base_masks)]
    assert kept[0] == kept[1]
    assert not any(np.any(inverted_masks[k] & base_masks[k]) for k in prunable)
    # Same init and diagnostics batch: 'before' agrees; 'after' differs for every ablation.
    for other in (shuffled, inverted, reinit):
        assert other["gradient_flow"]["before"] == flow["before"]
        assert other["gradient_flow"]["after"] != flow["after"]
    assert reinit["ablation"] == "reinit"


def test_dense_has_nothing_to_ablate(tmp_path):
    proc = run_in_process(["--dataset", "digits", "--method", "dense", "--ablation", "shuffle",
                 "--workdir", str(tmp_path / "w")])
    assert proc.returncode == 2
    assert "--ablation shuffle" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_each_ablation_changes_only_its_own_step():
    import jax
    import jax.numpy as jnp

    from experiments import ablations, configs

    params = {"dense": {"kernel": jnp.arange(1.0, 13.0).reshape(3, 4), "bias": jnp.ones(4)}}
    masks = {"dense": {"kernel": jnp.arange(12).reshape(3, 4) % 3 == 0, "bias": jnp.ones(4, bool)}}
    fresh = {"params": {"dense": {"kernel": -jnp.ones((3, 4)), "bias": jnp.zeros(4)}}}
    key = jax.random.PRNGKey(0)
    variables = {"params": params}
    for ablation in ("none", "invert", "shuffle", "reinit"):
        config = configs.resolve(dataset="digits", arch="lenet5", method="snip",
                                 steps_per_epoch=11, ablation=ablation)
        direction = ablations.pruning_direction(config, "lowest")
        assert direction == ("highest" if ablation == "invert" else "lowest")
        shuffled = ablations.ablated_masks(config, masks, key)
        kept = shuffled["dense"]["kernel"]
        assert int(kept.sum()) == int(masks["dense"]["kernel"].sum())
        assert bool(jnp.all(kept == masks["dense"]["kernel"])) == (ablation != "shuffle")
        start = ablations.training_variables(config, variables, masks, lambda: fresh,
                                             log=lambda _: None)
        if ablation == "reinit":
            np.testing.assert_array_equal(start["params"]["dense"]["kernel"],
                                          np.where(masks["dense"]["kernel"], -1.0, 0.0))
        else:
            assert start is variables
