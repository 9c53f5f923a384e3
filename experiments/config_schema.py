"""The run config's schema: every setting once, with its help, its check and its group.

A run is described by one frozen :class:`Config`. Each field is declared with
:func:`setting`, which carries the help text, the command-line group and the
check of its value; ``experiments.cli`` generates the parser from these
fields, so adding a setting is one field here (plus, if the paper fixes it, a
preset value in ``experiments.presets``).

This module imports nothing of the runner: the scoring modules below the
method registry read a Config, and the registry sits below the resolution and
validation of one (``experiments.configs``). A setting whose values a registry
holds (``--method``: the method registry's names) is marked ``registered`` here;
the code that builds a parser or validates a config passes the registry's names
in (:func:`field_choices`), so a name registered at run time (a plugin) is a
choice from then on, and nothing here is written by the registry.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Mapping, Optional, Sequence

ABLATIONS = ("none", "shuffle", "invert", "reinit")

# Default network per dataset when --arch is not given.
DEFAULT_ARCH = {
    "cifar10": "vgg19",
    "cifar100": "vgg19",
    "tiny_imagenet": "vgg19",
    "imagenet2012": "resnet50",
    "digits": "lenet5",
}

# The largest seed whose PRNG key is its own: jax.random.PRNGKey folds a seed
# into 32 bits, so 2**32 would draw seed 0's initialization.
MAX_SEED = 2**32 - 1


class UsageError(ValueError):
    """A setting, or a combination of settings, that cannot run; the message names it."""


# --------------------------------------------------------------------------
# Checks: each returns None for a good value, else what the value should be.


def number_check(check: Callable[[Any], bool], what: str) -> Callable[[Any], Optional[str]]:
    """A check of a real number (not a bool) for which ``check`` holds; ``what`` names a
    good value in the message, and in argparse's (the check's ``__name__``)."""

    def problem(value: Any) -> Optional[str]:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and check(value)
        return None if ok else what

    problem.__name__ = what
    return problem


positive_int = number_check(lambda v: float(v).is_integer() and v >= 1, "a positive integer")
nonnegative_int = number_check(lambda v: float(v).is_integer() and v >= 0, "a non-negative integer")
positive_float = number_check(lambda v: 0 < v < math.inf, "a positive number")
nonnegative_float = number_check(lambda v: 0 <= v < math.inf, "a non-negative number")
fraction = number_check(lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
seed_value = number_check(lambda v: float(v).is_integer() and 0 <= v <= MAX_SEED,
                     f"an integer in [0, {MAX_SEED}] (seeds map one-to-one onto 32-bit PRNG keys)")


def nonempty_path(value: Any) -> Optional[str]:
    return None if isinstance(value, str) and value.strip() else "a non-empty path"


# Compute dtypes a run trains in. float16 is refused rather than listed: its 5-bit exponent
# underflows small gradients to 0 unless the loss is scaled up (dynamic loss scaling), which
# the train step does not do; bfloat16 keeps float32's 8-bit exponent and needs no scaling.
COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype_value(value: Any) -> Optional[str]:
    """One of COMPUTE_DTYPES; for float16, the reason it is not one."""
    if value in COMPUTE_DTYPES:
        return None
    if value == "float16":
        return ("float32 or bfloat16: float16 needs dynamic loss scaling, which is not "
                "implemented (its narrow exponent range underflows small gradients); bfloat16 "
                "has float32's exponent range and needs none")
    return " or ".join(COMPUTE_DTYPES)


def positive_floats(value: Any) -> Optional[str]:
    ok = isinstance(value, tuple) and all(nonnegative_float(v) is None for v in value)
    return None if ok else "a comma-separated list of non-negative numbers"


# --------------------------------------------------------------------------
# Fields.


def setting(default: Any, help: str, *, group: str, check: Optional[Callable] = None,
            choices: Optional[Callable[[], tuple[str, ...]]] = None, registered: bool = False,
            run_control: bool = False, metavar: Optional[str] = None) -> Any:
    """A Config field with what the CLI and ``configs.validate`` need to know about it.

    ``choices`` is a function (the library's tables are read when the parser is
    built); ``registered`` marks a setting whose values a registry above this
    module holds: its choices are passed in by whoever builds a parser or validates
    a config (:func:`field_choices`). ``run_control`` marks settings that change
    where a run writes, how often it reports or how far it goes, but not its
    trajectory: a saved run may resume with other values of these.
    """
    meta = dict(help=help, group=group, check=check, choices=choices, registered=registered,
                run_control=run_control, metavar=metavar)
    return dataclasses.field(default=default, metadata=meta)


def field_choices(field: dataclasses.Field,
                  registered: Optional[Mapping[str, Sequence[str]]] = None
                  ) -> Optional[tuple[str, ...]]:
    """The values ``field`` may take, or None when its check alone decides.

    A ``registered`` setting takes ``registered[field.name]`` (a registry's names,
    passed in by the caller: ``{"method": methods.names()}``); a LookupError names
    the setting when they are not given. Any other setting takes its own ``choices``.
    """
    meta = field.metadata
    if meta.get("registered"):
        if not registered or field.name not in registered:
            raise LookupError(f"--{field.name} takes its choices from a registry: pass its "
                              f"names as registered={{{field.name!r}: names}}")
        return tuple(registered[field.name])
    return meta["choices"]() if meta.get("choices") is not None else None


def nm_pattern(value: Any) -> Optional[str]:
    """``"N:M"`` with 0 < N < M."""
    parts = value.split(":") if isinstance(value, str) else []
    ok = len(parts) == 2 and all(p.isdigit() for p in parts) and 0 < int(parts[0]) < int(parts[1])
    return None if ok else "N:M with integers 0 < N < M, e.g. 2:4"


def _scopes() -> tuple[str, ...]:
    from grasp_jax import budgets

    return budgets.SCOPES


def _datasets() -> tuple[str, ...]:
    from grasp_jax import data

    return data.dataset_names()


def _archs() -> tuple[str, ...]:
    from grasp_jax import models

    return tuple(models.ARCHS)


WHAT, OPTIM, PRUNE, SCORE, RUNNING = ("what to run", "optimization", "pruning",
                                     "scoring data", "running")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that determines a run. After ``configs.resolve``, only ``max_steps``,
    ``data_dir`` and ``checkpoint_every_steps`` may be ``None``."""

    dataset: str = setting("cifar10", "dataset (the data package's registry)", group=WHAT,
                           choices=_datasets)
    arch: Optional[str] = setting(None, "network (default per dataset: " + ", ".join(
        f"{d} {a}" for d, a in DEFAULT_ARCH.items()) + ")", group=WHAT, choices=_archs,
        metavar="ARCH")
    method: str = setting("grasp", "pruning criterion; 'dense' trains the unpruned network",
                          group=WHAT, registered=True)  # experiments.methods' names
    sparsity: float = setting(0.9, "fraction of conv/dense weights to prune, in [0, 1) "
                              "(0 for dense)", group=WHAT, check=fraction)
    seed: int = setting(0, "seeds init, scoring data, data order, augmentation and dropout",
                        group=WHAT, check=seed_value)
    image_size: Optional[int] = setting(None, "train and evaluate at this image size instead "
                                        "of the dataset's own (imagenet2012: 224; smaller for "
                                        "smoke runs)", group=WHAT, check=positive_int)

    # PyTorch-style SGD: weight decay is added to the gradient before momentum.
    epochs: int = setting(160, "length of the schedule", group=OPTIM, check=positive_int)
    batch_size: int = setting(128, "global batch over all devices of all processes; must "
                              "divide by the device count", group=OPTIM, check=positive_int)
    lr: float = setting(0.1, "initial learning rate (scaled linearly by batch_size / preset "
                        "batch when --batch_size is changed)", group=OPTIM, check=positive_float)
    momentum: float = setting(0.9, "SGD momentum", group=OPTIM, check=fraction)
    weight_decay: float = setting(5e-4, "L2 added to the gradient, PyTorch style", group=OPTIM,
                                  check=nonnegative_float)
    lr_decay_epochs: tuple[float, ...] = setting(
        (80, 120), "epochs (fractions allowed) at which the lr is multiplied by "
        "--lr_decay_factor (preset: 50%% and 75%% of --epochs; ImageNet every third)",
        group=OPTIM, check=positive_floats)
    lr_decay_factor: float = setting(0.1, "factor of each lr decay", group=OPTIM,
                                     check=positive_float)
    compute_dtype: str = setting(
        "float32", "dtype of activations and of matmul/conv inputs in training and evaluation: "
        "float32 (the paper) or bfloat16 (the fast path on TPUs and Ampere+ GPUs; parameters, "
        "optimizer state, BatchNorm statistics, masks, loss and scoring stay float32). "
        "float16 is refused: it needs loss scaling, which is not implemented", group=OPTIM,
        check=compute_dtype_value, metavar="DTYPE")
    steps_per_epoch: int = 0  # derived from the dataset and batch_size; not a flag

    scope: str = setting("global", "global: rank all layers together (the paper); layerwise "
                         "(= uniform): prune each layer by --sparsity; erk: per-layer budgets "
                         "Erdős–Rényi-kernel (Evci et al., 2020)", group=PRUNE,
                         choices=_scopes)
    nm: Optional[str] = setting(None, "structured N:M masks instead of --sparsity, e.g. 2:4 "
                                "(keep 2 of every 4 consecutive weights along each kernel's "
                                "input axis, as sparse tensor cores need); one-shot",
                                group=PRUNE, check=nm_pattern, metavar="N:M")
    tie_break: str = setting("position", "how equal scores at the threshold are ordered: by "
                             "position (earlier first) or seeded random; both deterministic",
                             group=PRUNE, choices=lambda: ("position", "random"))
    rounds: int = setting(1, "iterative pruning rounds", group=PRUNE, check=positive_int)
    prune_schedule: str = setting("exponential", "sparsity schedule across --rounds",
                                  group=PRUNE, choices=lambda: ("exponential", "linear"))
    score_bn_mode: str = setting(
        "train", "BatchNorm while scoring on data: train (batch statistics; the GraSP "
        "authors' net.train()) or eval (running statistics; Synaptic-Flow's default "
        "model.eval())", group=PRUNE, choices=lambda: ("train", "eval"))
    temperature: float = setting(1.0, "divide logits by this while scoring", group=PRUNE,
                                 check=positive_float)
    score_reinit_dense: bool = setting(
        False, "score a copy whose dense layers are re-drawn Xavier-normal, as the reference "
        "GraSP does (the masks go to the original initialization)", group=PRUNE)
    score_reinit_layers: str = setting(
        "all", "which dense layers that copy re-draws: all (reference pruner/GraSP.py) or only "
        "the last (pruner/GraSP_ImageNet.py)", group=PRUNE, choices=lambda: ("all", "last"))
    ablation: str = setting("none", "sanity check (Frankle et al., 2021): shuffle = permute each "
                            "layer's mask, invert = keep what the method would prune (same "
                            "count), reinit = train the kept weights from a fresh initialization",
                            group=PRUNE, choices=lambda: ABLATIONS)
    gradient_flow: bool = setting(True, "measure the loss, ||g||^2 and g^T H g at init before "
                                  "and after pruning on a training batch other than the scoring "
                                  "batch (results.json: gradient_flow)", group=PRUNE,
                                  run_control=True)

    score_samples_per_class: int = setting(10, "class-balanced scoring draw: images per class",
                                           group=SCORE, check=nonnegative_int)
    score_draws: int = setting(1, "number of class-balanced draws, each scored in two halves",
                               group=SCORE, check=nonnegative_int)
    score_batches: int = setting(0, "score on this many training batches instead of "
                                 "class-balanced draws (ImageNet); 0 = draws", group=SCORE,
                                 check=nonnegative_int)
    score_batch_size: int = setting(128, "images per scoring batch (with --score_batches)",
                                    group=SCORE, check=positive_int)
    score_chunk_size: int = setting(0, "images per forward pass while scoring with "
                                    "--score_batches (the last chunk of a batch may be "
                                    "smaller); 0 = whole batches", group=SCORE,
                                    check=nonnegative_int)

    max_steps: Optional[int] = setting(None, "stop after this many steps (smoke runs); the lr "
                                       "schedule still spans --epochs, so a later, larger value "
                                       "continues the same run", group=RUNNING,
                                       check=positive_int, run_control=True)
    data_dir: Optional[str] = setting(None, "TFDS data dir (or the tiny-imagenet-200 folder); "
                                      "default: TFDS_DATA_DIR or ~/tensorflow_datasets",
                                      group=RUNNING, check=nonempty_path, run_control=True)
    checkpoint_every_steps: Optional[int] = setting(
        None, "also checkpoint every N steps (always: every epoch, at the end, and when "
        "stopped by a signal)", group=RUNNING, check=positive_int, run_control=True)
    keep_checkpoints: int = setting(3, "how many recent checkpoints to keep", group=RUNNING,
                                    check=positive_int, run_control=True)
    log_every_steps: int = setting(50, "training metrics are written every N steps",
                                   group=RUNNING, check=positive_int, run_control=True)

    @property
    def total_steps(self) -> int:
        """Steps of the full schedule (``epochs`` epochs)."""
        return self.epochs * self.steps_per_epoch

    @property
    def num_steps(self) -> int:
        """Steps this run trains for: the schedule, cut at ``max_steps``."""
        if self.max_steps is None:
            return self.total_steps
        return min(self.total_steps, self.max_steps)

    @property
    def num_score_microbatches(self) -> int:
        """How many chunks the scoring data is fed to the network in."""
        if self.score_batches:
            chunk = self.score_chunk_size or self.score_batch_size
            return self.score_batches * -(-self.score_batch_size // chunk)
        # The reference feeds each class-balanced draw in two halves.
        return 2 * self.score_draws

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lr_decay_epochs"] = list(self.lr_decay_epochs)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "lr_decay_epochs" in d:
            d["lr_decay_epochs"] = tuple(d["lr_decay_epochs"])
        return cls(**d)


def flag_fields() -> tuple[dataclasses.Field, ...]:
    """The fields a user sets (all but the derived ``steps_per_epoch``)."""
    return tuple(f for f in dataclasses.fields(Config) if "help" in f.metadata)


RUN_CONTROL_FIELDS = tuple(f.name for f in flag_fields() if f.metadata["run_control"])


def differences(saved: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(field, saved value, new value) for every field that makes the runs differ."""
    out = []
    for f in dataclasses.fields(Config):
        if f.name in RUN_CONTROL_FIELDS:
            continue
        a, b = getattr(saved, f.name), getattr(new, f.name)
        if a != b:
            out.append((f.name, a, b))
    return out


def dataset_info(config: Config) -> Any:
    """The data package's DatasetInfo of ``config`` (its image size, if set)."""
    from grasp_jax import data

    try:
        return data.get_info(config.dataset, image_size=config.image_size)
    except ValueError as e:
        raise UsageError(f"--image_size {config.image_size}: {e}") from None


def lr_boundaries(config: Config) -> dict[int, float]:
    """optax.piecewise_constant_schedule boundaries: step -> multiplicative factor."""
    out: dict[int, float] = {}
    for epoch in config.lr_decay_epochs:
        step = int(round(epoch * config.steps_per_epoch))
        out[step] = out.get(step, 1.0) * config.lr_decay_factor
    return out
