"""Gradient flow at initialization, before and after pruning.

GraSP's criterion is built on the first-order change of the gradient norm,
ΔL(θ) ≈ gᵀHg·η (paper, eq. 5): a network whose pruning keeps gᵀg large (and
gᵀHg, the curvature along g) trains. These numbers make the paper's claim
checkable on any model: at extreme sparsity GraSP should keep more gradient
flow than SNIP or random pruning.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from grasp_jax.accumulate import prunable_loss
from grasp_jax.masks import apply_masks, check_same_structure
from grasp_jax.platforms import per_platform
from grasp_jax.precision import SCORING_PRECISION, check_matmul_precision, precision_scope
from grasp_jax.prunable import PrunableSpec, check_leaf_dtypes, prunable_flags, split_prunable

PyTree = Any

__all__ = ["gradient_flow"]


@functools.partial(jax.jit, static_argnames=("loss_fn", "flags"))
def _flow(params, masks, batch, *, loss_fn, flags):
    # Traced once per platform: the model's backend choices are plain ones inside.
    return per_platform(functools.partial(_flow_on, loss_fn=loss_fn, flags=flags),
                        params, masks, batch)


def _flow_on(params, masks, batch, *, loss_fn, flags):
    theta, loss_of = prunable_loss(params, loss_fn, flags)
    m, _, _ = split_prunable(masks, flags)

    def loss_of_theta(t):
        return loss_of(t, batch)

    loss, g = jax.value_and_grad(loss_of_theta)(theta)
    # Only kept weights are parameters of the pruned network: the gradient and
    # the Hessian are restricted to them, g_m = m ⊙ g and H_mm = diag(m) H diag(m).
    gm = [gi * mi.astype(gi.dtype) for gi, mi in zip(g, m)]
    _, hgm = jax.jvp(jax.grad(loss_of_theta), (theta,), (gm,))
    grad_norm_sq = sum(jnp.sum(x * x) for x in gm)
    ghg = sum(jnp.sum(a * b) for a, b in zip(gm, hgm))
    return {"loss": loss, "grad_norm_sq": grad_norm_sq, "gHg": ghg}


def gradient_flow(
    params: PyTree,
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    batch: PyTree,
    *,
    masks: PyTree | None = None,
    prunable: PrunableSpec = None,
    matmul_precision: str | None = SCORING_PRECISION,
) -> dict[str, float]:
    """Loss, ‖g‖² and gᵀHg over the kept prunable weights.

    With keep-masks m (all ones when ``masks`` is None), the network is
    evaluated at θ ⊙ m and

        g = m ⊙ ∇_θ L(θ ⊙ m),   grad_norm_sq = gᵀg,   gHg = gᵀ ∇²_θθ L(θ ⊙ m) g.

    Measure it on a batch that is not the scoring batch, with BatchNorm in
    training mode inside ``loss_fn``, as for scoring, and at the same
    ``matmul_precision`` (float32 on every backend unless None: see
    :func:`grasp_jax.grasp_scores`). Returns Python floats.
    """
    precision = check_matmul_precision(matmul_precision)
    flags = prunable_flags(params, prunable)
    check_leaf_dtypes(params, flags)
    if masks is None:
        masks = jax.tree_util.tree_map(lambda x: jnp.ones(jnp.shape(x), bool), params)
    else:
        check_same_structure(masks, params)
        params = apply_masks(params, masks)
    with precision_scope(precision):
        out = _flow(params, masks, batch, loss_fn=loss_fn, flags=flags)
    return {k: float(v) for k, v in jax.device_get(out).items()}
