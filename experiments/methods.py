"""The pruning criteria a run can use: one registry entry each.

An entry says everything the runner needs to know about a criterion: its name
(the ``--method`` choice), which end of its ranking is pruned, the config
values it implies (GraSP's temperature, SynFlow's rounds) and how it builds
``params -> scores`` from the network and the data. Adding a criterion is one
:func:`register` call with its score-function builder::

    methods.register(methods.Method(
        name="my_score", direction="lowest", summary="|θ| + noise",
        build=lambda ctx: lambda params: my_scores(params, ctx.key)))

The CLI's choices, the sweep's names and the README's method table all come
from :data:`REGISTRY`.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import grasp_jax as gj

from experiments.signals import Stopped

if TYPE_CHECKING:  # the config imports this registry, not the other way round
    import flax.linen as nn
    import jax

    from experiments.configs import Config

PyTree = Any
ScoreFn = Callable[[PyTree], PyTree]


def never() -> bool:
    return False


@dataclasses.dataclass(frozen=True)
class Context:
    """What a score-function builder may use: the run's config, the network at
    its initialization, a key for the criterion's own randomness, a logger, and
    ``stop_requested()``, which long scoring polls between batches (on every
    process at the same points: it may be a collective) to raise
    ``signals.Stopped``."""

    config: "Config"
    model: "nn.Module"
    variables: PyTree  # {"params": ..., "batch_stats": ...}
    key: "jax.Array"
    image_shape: tuple[int, ...]
    log: Callable[[str], None] = print
    stop_requested: Callable[[], bool] = never

    @property
    def params(self) -> PyTree:
        return self.variables["params"]

    @property
    def batch_stats(self) -> PyTree:
        return self.variables.get("batch_stats", {})


@dataclasses.dataclass(frozen=True)
class Method:
    """One criterion. ``build`` is None for a method that prunes nothing (dense)."""

    name: str
    direction: Optional[str]  # "highest" or "lowest": the end of the ranking removed
    summary: str  # one line for --help and the README
    build: Optional[Callable[[Context], ScoreFn]] = None
    preset: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    needs_data: bool = False  # scores on training images (then a scoring batch is read)

    @property
    def prunes(self) -> bool:
        return self.build is not None


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a ValueError if its name is taken)."""
    if method.name in REGISTRY:
        raise ValueError(f"a method named {method.name!r} is already registered")
    if method.prunes and method.direction not in ("highest", "lowest"):
        raise ValueError(f"method {method.name!r}: direction must be 'highest' or 'lowest', "
                         f"got {method.direction!r}")
    REGISTRY[method.name] = method
    return method


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def markdown_table() -> str:
    """The README's table of criteria, from the registry."""
    rows = ["| `--method` | scores | prunes | preset |", "|---|---|---|---|"]
    for m in REGISTRY.values():
        preset = ", ".join(f"{k}={v}" for k, v in m.preset.items()) or "–"
        summary = m.summary.replace("|", "\\|")  # |θ| would end the cell
        rows.append(f"| `{m.name}` | {summary} | {m.direction or 'nothing'} | {preset} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------
# The criteria of the paper's comparison.


def _grasp(ctx: Context) -> ScoreFn:
    from experiments import data_scoring

    return data_scoring.data_scorer(ctx, gj.grasp_scores)


def _grasp_abs(ctx: Context) -> ScoreFn:
    from experiments import data_scoring

    return data_scoring.data_scorer(ctx, gj.grasp_abs_scores)


def _snip(ctx: Context) -> ScoreFn:
    from experiments import data_scoring

    return data_scoring.data_scorer(ctx, gj.snip_scores)


def _synflow(ctx: Context) -> ScoreFn:
    model, batch_stats = ctx.model, ctx.batch_stats

    def apply_fn(p, x):
        # Inference mode: batch statistics would normalize the all-ones input away.
        return model.apply({"params": p, "batch_stats": batch_stats}, x, train=False)

    return lambda p: gj.synflow_scores(p, apply_fn, ctx.image_shape)


register(Method("grasp", gj.criteria.PRUNE_DIRECTION["grasp"],
                "S(-θ) = -θ ⊙ Hg (Wang et al., 2020)",
                _grasp, needs_data=True,
                # pruner/GraSP.py: logits / T with T = 200, scored on a copy with
                # Xavier-redrawn dense layers (reinit=True).
                preset=dict(temperature=200.0, score_reinit_dense=True)))
register(Method("grasp_abs", gj.criteria.PRUNE_DIRECTION["grasp_abs"],
                "|θ ⊙ Hg|, gradient-norm preservation (Lubana & Dick, 2021)", _grasp_abs,
                needs_data=True,
                # Scored exactly as GraSP (T = 200, the re-drawn copy), so that only
                # the criterion differs in a comparison.
                preset=dict(temperature=200.0, score_reinit_dense=True)))
register(Method("snip", gj.criteria.PRUNE_DIRECTION["snip"], "|θ ⊙ g| (Lee et al., 2019)", _snip,
                needs_data=True))
register(Method("synflow", gj.criteria.PRUNE_DIRECTION["synflow"],
                "|θ ⊙ ∂R/∂θ|, data-free (Tanaka et al., 2020)", _synflow,
                # Tanaka et al., 2020, §6: 100 rounds on the exponential schedule.
                preset=dict(rounds=100)))
register(Method("magnitude", gj.criteria.PRUNE_DIRECTION["magnitude"], "|θ|",
                lambda ctx: gj.magnitude_scores))
register(Method("random", gj.criteria.PRUNE_DIRECTION["random"], "uniform noise",
                lambda ctx: lambda p: gj.random_scores(p, ctx.key)))
register(Method("dense", None, "no pruning"))


# --------------------------------------------------------------------------
# From a criterion to masks.


def compute_masks(config: "Config", model: "nn.Module", variables: PyTree, key: "jax.Array",
                  image_shape: tuple[int, ...], log: Callable[[str], None] = print,
                  stop_requested: Callable[[], bool] = never) -> PyTree:
    """Boolean keep-masks with the structure of ``variables['params']``.

    A method that prunes nothing keeps everything; the others prune
    ``config.sparsity`` of the conv/dense kernels in ``config.rounds`` rounds
    (one-shot when 1) on ``config.prune_schedule``, ranked over
    ``config.scope``. The ``invert`` and ``shuffle`` ablations are the core's
    (:func:`grasp_jax.ablations.inverted_direction`, :func:`grasp_jax.ablations.shuffle_masks`).
    Raises ``signals.Stopped`` when ``stop_requested()`` turns true between
    rounds (or between the batches of streamed scoring).
    """
    import jax

    method = get(config.method)
    params = variables["params"]
    if not method.prunes:
        return jax.tree_util.tree_map(lambda p: jax.numpy.ones(p.shape, bool), params)
    start = time.time()
    score_fn = method.build(Context(config, model, variables, key, tuple(image_shape), log,
                                    stop_requested))
    every = max(1, config.rounds // 10)

    def progress(r: int, s: float, _masks: PyTree) -> None:
        if config.rounds > 1 and (r % every == 0 or r == config.rounds):
            log(f"  round {r}/{config.rounds}: sparsity {s:.4%}")
        if r < config.rounds and stop_requested():  # after the last round the masks are done
            raise Stopped(f"after round {r} of {config.rounds}")

    direction = method.direction
    if config.ablation == "invert":
        direction = gj.ablations.inverted_direction(direction)
    tie_key = jax.random.fold_in(key, 4) if config.tie_break == "random" else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if config.nm:
            n, m = (int(v) for v in config.nm.split(":"))
            masks = gj.nm_masks(score_fn(params), n, m, direction=direction)
        else:
            masks = gj.prune(params, score_fn, config.sparsity, direction=direction,
                             rounds=config.rounds, schedule=config.prune_schedule,
                             scope=config.scope, tie_break=config.tie_break, key=tie_key,
                             callback=progress)
    for w in caught:  # into the run's log; a collapse is the runner's own check
        if not issubclass(w.category, gj.LayerCollapseWarning):
            log(f"warning: {w.message}")
    if config.ablation == "shuffle":
        masks = gj.ablations.shuffle_masks(masks, jax.random.fold_in(key, 2))
    masks = jax.block_until_ready(masks)
    note = "" if config.ablation == "none" else f" (ablation: {config.ablation})"
    log(f"pruned with {config.method}{note} in {time.time() - start:.1f}s")
    return masks
