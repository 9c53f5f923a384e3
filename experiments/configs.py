"""A run's config resolved from the presets and validated: above the method registry.

The schema (every setting, its help, check and group) is
``experiments.config_schema``, which imports nothing of the runner; its names
are imported from there, not from here. Presets are data (``experiments.presets``): rows
keyed by dataset, architecture family and method, each naming its source in
the paper (Wang, Zhang & Grosse, ICLR 2020) or the authors' code
(alecwangcq/GraSP). :func:`resolve` applies the matching rows in order, then
the method registry's own values, then whatever the user gave.

The learning rate of a preset is quoted at the preset's batch size; another
``batch_size`` scales it linearly (Goyal et al., 2017) unless ``lr`` is given.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from experiments import methods
from experiments.config_schema import (
    DEFAULT_ARCH,
    Config,
    UsageError,
    field_choices,
    flag_fields,
    nm_pattern,
)
from experiments.presets import UnknownDataset, preset

# --------------------------------------------------------------------------
# Resolving a config from the presets.


def resolve(*, dataset: str, arch: Optional[str] = None, method: str = "grasp",
            steps_per_epoch: int, **overrides: Any) -> Config:
    """A full Config: the preset for (dataset, arch, method), then ``overrides``.

    Args:
      dataset, arch, method: what to run (``arch`` defaults per dataset).
      steps_per_epoch: training steps per epoch at the resolved batch size
        (the caller asks the input pipeline; see ``experiments.run``).
      overrides: Config fields; ``None`` values mean "use the preset".
    """
    arch = arch or DEFAULT_ARCH[dataset]
    if method not in methods.names():
        raise UsageError(f"unknown method {method!r}; valid: {', '.join(methods.names())}")
    try:
        p = preset(dataset, arch, method)
    except UnknownDataset as e:
        raise UsageError(str(e)) from None
    given = {k: v for k, v in overrides.items() if v is not None}
    if "lr" not in given:
        # Linear scaling rule: the preset's lr is quoted at its own batch size.
        given["lr"] = p["lr"] * given.get("batch_size", p["batch_size"]) / p["batch_size"]
    decay_at = p.pop("lr_decay_at")
    if "lr_decay_epochs" not in given:
        # The reference decays at int(epochs * 0.5) and int(epochs * 0.75): the
        # same for every preset, but 0 for a 1-epoch run, which would train at
        # lr/100 from step 0. Fractional epochs keep the decays at 50% / 75% of
        # any schedule; rounding keeps 150 * (1/3) at 50.
        epochs = given.get("epochs", p.get("epochs"))
        given["lr_decay_epochs"] = tuple(_whole_if_integral(round(f * epochs, 6)) for f in decay_at)
    if not methods.get(method).prunes:
        given["sparsity"] = 0.0
    if given.get("nm") and nm_pattern(given["nm"]) is None:
        n, m = (int(v) for v in given["nm"].split(":"))
        given["sparsity"] = 1 - n / m  # what N:M masks remove, for reports and sweeps
    p.update(given)
    return Config(dataset=dataset, arch=arch, method=method, steps_per_epoch=steps_per_epoch, **p)


def _whole_if_integral(x: float) -> float:
    return int(x) if float(x).is_integer() else x


# --------------------------------------------------------------------------
# Checks of a whole config.


def validate(config: Config) -> None:
    """Raise UsageError naming the first bad value or combination of ``config``.

    Every field's own check, then what fields say about each other. Checks that
    need the data or the devices are ``experiments.run_config.check_environment``'s.
    """
    registered = {"method": methods.names()}
    for f in flag_fields():
        value, meta = getattr(config, f.name), f.metadata
        if value is None and f.default is None:
            continue
        if meta["check"] is not None and (problem := meta["check"](value)) is not None:
            raise UsageError(f"--{f.name} {value!r}: not {problem}")
        choices = field_choices(f, registered)
        if choices is not None and value not in choices:
            raise UsageError(f"--{f.name} {value!r}: not one of {', '.join(choices)}")
    method = methods.get(config.method)
    check_method_settings(config.method, config.to_dict())
    if config.nm and (config.rounds != 1 or config.scope != "global"):
        raise UsageError(f"--nm {config.nm} is one-shot and sets each group's density itself; "
                         f"got --rounds {config.rounds} --scope {config.scope}")
    if config.score_batches and config.score_chunk_size > config.score_batch_size:
        raise UsageError(f"--score_chunk_size {config.score_chunk_size} is larger than its batch "
                         f"(--score_batch_size {config.score_batch_size})")
    if method.needs_data and not config.score_batches and not (
            config.score_draws and config.score_samples_per_class):
        raise UsageError(f"--method {config.method} scores on data, but there is none: give "
                         "--score_batches, or --score_draws and --score_samples_per_class")


def check_method_settings(method: str, settings: Mapping[str, Any]) -> None:
    """UsageError when ``settings`` (given flags, or a whole config) ask a method that
    prunes nothing to prune or to ablate. Checked before :func:`resolve`, which sets a
    dense run's sparsity to 0."""
    if method not in methods.names():
        raise UsageError(f"unknown method {method!r}; valid: {', '.join(methods.names())}")
    if methods.get(method).prunes:
        return
    if settings.get("sparsity"):
        raise UsageError(f"--method {method} prunes nothing; got --sparsity "
                         f"{settings['sparsity']}")
    if settings.get("ablation", "none") != "none":
        raise UsageError(f"--method {method} prunes nothing to ablate; got --ablation "
                         f"{settings['ablation']}")
