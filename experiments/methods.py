"""The pruning criteria a run can use: one registry entry each.

An entry points at a core criterion (``grasp_jax.criteria.CRITERIA``: its
direction, what it needs from the data and how its scores come from g and Hg)
and adds what only the runner knows: its ``--method`` name, a summary, the
config values it implies (GraSP's temperature, SynFlow's rounds) and, for a
data-free criterion, how it builds ``params -> scores`` from the network. A
data-dependent criterion needs no builder: the runner scores it on the
config's data, in memory or streamed, on one device or several, in one pass
or two from what the core entry needs. Adding a criterion is one core entry
and one line here::

    gj.criteria.register(gj.criteria.Criterion("my_score", "lowest", "gradient", my_from_sums))
    methods.register(methods.Method("my_score", "my_score", "θ² · |g|"))

The CLI's choices, the sweep's names and the README's method table all come
from :data:`REGISTRY`.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax

import grasp_jax as gj
from grasp_jax.data import DatasetInfo

from experiments import ablations, data_scoring, streamed_scoring
from experiments.config_schema import Config
from experiments.data_scoring import Context, never
from experiments.signals import Stopped

PyTree = Any
ScoreFn = Callable[[PyTree], PyTree]


@dataclasses.dataclass(frozen=True)
class Method:
    """One ``--method``: the core criterion it prunes by (None for a method that prunes
    nothing: dense), a one-line summary for --help and the README, and the config values
    it implies. ``build`` makes ``params -> scores`` from a :class:`Context`; a
    data-dependent criterion may leave it out (the runner scores it on the config's data,
    :func:`data_scorer`), a data-free one must give it."""

    name: str
    criterion: Optional[str]  # a name in gj.criteria.CRITERIA
    summary: str
    build: Optional[Callable[[Context], ScoreFn]] = None
    preset: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def prunes(self) -> bool:
        return self.criterion is not None

    @property
    def core(self) -> gj.criteria.Criterion:
        """The core criterion's entry."""
        return gj.criteria.get(self.criterion)

    @property
    def direction(self) -> Optional[str]:
        """The end of the ranking removed: the core criterion's ("highest" or "lowest")."""
        return self.core.direction if self.prunes else None

    @property
    def needs_data(self) -> bool:
        """Whether it scores on training images (then scoring data is read)."""
        return self.prunes and self.core.needs != "none"

    def score_fn(self, ctx: Context) -> ScoreFn:
        """``params -> scores`` for a run: the entry's builder, or the core criterion
        scored on the config's data."""
        if self.build is not None:
            return self.build(ctx)
        return data_scorer(ctx, self.core)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a ValueError if its name is taken)."""
    if method.name in REGISTRY:
        raise ValueError(f"a method named {method.name!r} is already registered")
    if method.prunes:
        if method.criterion not in gj.criteria.CRITERIA:
            raise ValueError(f"method {method.name!r}: criterion {method.criterion!r} is not in "
                             f"grasp_jax.criteria.CRITERIA (register it there first); known: "
                             f"{sorted(gj.criteria.CRITERIA)}")
        if method.build is None and not method.needs_data:
            raise ValueError(f"method {method.name!r}: the data-free criterion "
                             f"{method.criterion!r} needs a build (params -> scores)")
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
# Data-dependent criteria on the config's data.


def data_scorer(ctx: Context, criterion: gj.criteria.Criterion) -> ScoreFn:
    """``params -> scores`` of a data-dependent core criterion on the config's scoring
    data: streamed over ``score_batches`` training batches when set, else the
    class-balanced draws in memory; on every device; on the re-drawn copy when set."""
    if ctx.config.score_batches:
        scores_of = streamed_scoring.streamed_scorer(ctx, criterion)
    else:
        scores_of = data_scoring.in_memory_scorer(ctx, criterion)
    return data_scoring.on_scoring_copy(ctx, scores_of)


# --------------------------------------------------------------------------
# The criteria of the paper's comparison.


def _synflow(ctx: Context) -> ScoreFn:
    model, batch_stats = ctx.model, ctx.batch_stats

    def apply_fn(p, x):
        # Inference mode: batch statistics would normalize the all-ones input away.
        return model.apply({"params": p, "batch_stats": batch_stats}, x, train=False)

    return lambda p: gj.synflow_scores(p, apply_fn, ctx.image_shape)


register(Method("grasp", "grasp", "S(-θ) = -θ ⊙ Hg (Wang et al., 2020)",
                # pruner/GraSP.py: logits / T with T = 200, scored on a copy with
                # Xavier-redrawn dense layers (reinit=True).
                preset=dict(temperature=200.0, score_reinit_dense=True)))
register(Method("grasp_abs", "grasp_abs",
                "|θ ⊙ Hg|, gradient-norm preservation (Lubana & Dick, 2021)",
                # Scored exactly as GraSP (T = 200, the re-drawn copy), so that only
                # the criterion differs in a comparison.
                preset=dict(temperature=200.0, score_reinit_dense=True)))
register(Method("snip", "snip", "|θ ⊙ g| (Lee et al., 2019)"))
register(Method("synflow", "synflow", "|θ ⊙ ∂R/∂θ|, data-free (Tanaka et al., 2020)", _synflow,
                # Tanaka et al., 2020, §6: 100 rounds on the exponential schedule.
                preset=dict(rounds=100)))
register(Method("magnitude", "magnitude", "|θ|", lambda ctx: gj.magnitude_scores))
register(Method("random", "random", "uniform noise",
                lambda ctx: lambda p: gj.random_scores(p, ctx.key)))
register(Method("dense", None, "no pruning"))


# --------------------------------------------------------------------------
# From a criterion to masks.


def compute_masks(config: Config, model: nn.Module, variables: PyTree, key: jax.Array,
                  info: DatasetInfo, log: Callable[[str], None] = print,
                  stop_requested: Callable[[], bool] = never) -> PyTree:
    """Boolean keep-masks with the structure of ``variables['params']``, for the network
    ``model`` on the images of ``info`` (the config's dataset's info, made once per run).

    A method that prunes nothing keeps everything; the others prune
    ``config.sparsity`` of the conv/dense kernels in ``config.rounds`` rounds
    (one-shot when 1) on ``config.prune_schedule``, ranked over
    ``config.scope``, with the ``invert`` and ``shuffle`` ablations applied
    (``experiments.ablations``; ``reinit`` comes after, on the variables).
    Raises ``signals.Stopped`` when ``stop_requested()`` turns true between
    rounds (or between the batches of streamed scoring).
    """
    method = get(config.method)
    params = variables["params"]
    if not method.prunes:
        return jax.tree_util.tree_map(lambda p: jax.numpy.ones(p.shape, bool), params)
    start = time.time()
    score_fn = method.score_fn(Context(config, info, model, variables, key, log, stop_requested))
    every = max(1, config.rounds // 10)

    def progress(r: int, s: float, _masks: PyTree) -> None:
        if config.rounds > 1 and (r % every == 0 or r == config.rounds):
            log(f"  round {r}/{config.rounds}: sparsity {s:.4%}")
        if r < config.rounds and stop_requested():  # after the last round the masks are done
            raise Stopped(f"after round {r} of {config.rounds}")

    direction = ablations.pruning_direction(config, method.direction)
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
    masks = ablations.ablated_masks(config, masks, key)
    masks = jax.block_until_ready(masks)
    note = "" if config.ablation == "none" else f" (ablation: {config.ablation})"
    log(f"pruned with {config.method}{note} in {time.time() - start:.1f}s")
    return masks
