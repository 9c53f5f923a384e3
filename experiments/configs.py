"""The paper's training and pruning settings, as code.

A run is described by one frozen :class:`Config`. :func:`preset` holds every
fact taken from the paper (Wang, Zhang & Grosse, ICLR 2020) and the authors'
reference code; :func:`resolve` fills a config from a preset plus whatever the
user overrode, and derives what depends on the dataset size.

Sources for the numbers below:

* CIFAR-10/100 and Tiny-ImageNet (paper §5 and the reference configs): batch
  128, SGD with momentum 0.9, learning rate 0.1 divided by 10 at 50% and 75%
  of training, weight decay 5e-4 for VGG and 1e-4 for ResNet, 160 epochs on
  CIFAR and 300 on Tiny-ImageNet.
* GraSP scoring (reference ``pruner/GraSP.py``): the logits are divided by a
  temperature T = 200; the scores are those of a copy of the network whose
  linear layers are re-drawn Xavier-normal (``reinit=True``; the masks go to
  the original); each "draw" is a class-balanced batch that is scored in
  two halves; 10 per class x 1 draw on CIFAR-10 and on CIFAR-100 with VGG19,
  5 per class x 2 draws on CIFAR-100 with ResNet-32, 1 per class x 10 draws on
  Tiny-ImageNet.
* ImageNet (reference ``main_prune_imagenet.py``, ``pruner/GraSP_ImageNet.py``,
  ``main_finetune_imagenet.py``): scores are summed over the first 150
  training batches, each fed to the network in chunks of at most 20 images;
  training is the standard PyTorch ImageNet recipe: 90 epochs, batch 256,
  learning rate 0.1 divided by 10 every 30 epochs (at 30 and 60), weight
  decay 1e-4. Our scoring batches have 128 images (as the issue asks) and
  :func:`grasp_jax.grasp_scores` needs equal chunks, so the chunk is 16 (the
  largest divisor of 128 not above 20): 8 chunks per batch, 1,200 in all.
* SynFlow (Tanaka et al., 2020): 100 rounds on the exponential schedule.

The learning rate of a preset is quoted at the preset's batch size; another
``batch_size`` scales it linearly (Goyal et al., 2017) unless ``lr`` is given.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

# The criteria a run can use; "dense" trains without pruning.
METHODS = ("grasp", "snip", "synflow", "magnitude", "random", "dense")
ABLATIONS = ("none", "shuffle", "invert", "reinit")

# Default network per dataset when --arch is not given.
DEFAULT_ARCH = {
    "cifar10": "vgg19",
    "cifar100": "vgg19",
    "tiny_imagenet": "vgg19",
    "imagenet2012": "resnet50",
    "digits": "lenet5",
}

# Fields that change where a run writes, how often it reports or how far it
# goes, but not the trajectory of the training itself. A saved run may be
# resumed with different values of these (e.g. a larger --max_steps extends a
# smoke run along the very same path); any other difference is refused.
RUN_CONTROL_FIELDS = (
    "max_steps",
    "data_dir",
    "checkpoint_every_steps",
    "log_every_steps",
    "keep_checkpoints",
    "gradient_flow",
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that determines a run. Resolved configs have no ``None`` left
    except in optional fields (``max_steps``, ``data_dir``,
    ``checkpoint_every_steps``)."""

    # What to train.
    arch: str
    dataset: str
    method: str = "grasp"
    sparsity: float = 0.9
    seed: int = 0

    # Optimization (PyTorch-style SGD: decay added to the gradient before momentum).
    epochs: int = 160
    batch_size: int = 128  # global, over all devices of all processes
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # The lr is multiplied by lr_decay_factor at each of these epochs (fractions allowed).
    lr_decay_epochs: tuple[float, ...] = (80, 120)
    lr_decay_factor: float = 0.1
    steps_per_epoch: int = 0  # derived from the dataset and batch_size

    # Pruning.
    scope: str = "global"  # or "layerwise"
    rounds: int = 1  # iterative pruning rounds (SynFlow: 100)
    prune_schedule: str = "exponential"
    temperature: float = 200.0  # GraSP's logits / T while scoring (1 for the other criteria)
    # Score a copy whose dense kernels are redrawn Xavier-normal (the reference GraSP's reinit).
    score_reinit_dense: bool = True
    # The scoring data: class-balanced draws ...
    score_samples_per_class: int = 10
    score_draws: int = 1
    # ... or, when score_batches > 0, the first training batches (ImageNet).
    score_batches: int = 0
    score_batch_size: int = 128
    score_chunk_size: int = 0  # microbatch size for score_batches; 0 = whole batches
    # Sanity checks (Frankle et al., 2021): none, shuffle (each layer's mask
    # permuted), invert (keep what the method would prune), reinit (train the
    # kept weights from a fresh initialization).
    ablation: str = "none"

    # Running.
    max_steps: Optional[int] = None  # stop early (the lr schedule still spans `epochs`)
    data_dir: Optional[str] = None
    checkpoint_every_steps: Optional[int] = None  # besides every epoch
    keep_checkpoints: int = 3
    log_every_steps: int = 50
    gradient_flow: bool = True  # measure loss, ||g||^2 and g^T H g before/after pruning

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
        """How many equal chunks the scoring batch is fed to the network in."""
        if self.score_batches:
            chunk = self.score_chunk_size or self.score_batch_size
            return self.score_batches * (self.score_batch_size // chunk)
        # The reference feeds each class-balanced draw in two halves.
        return 2 * self.score_draws

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lr_decay_epochs"] = list(self.lr_decay_epochs)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "lr_decay_epochs" in d:
            d["lr_decay_epochs"] = tuple(d["lr_decay_epochs"])
        return cls(**d)


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


def _family(arch: str) -> str:
    return "resnet" if arch.startswith("resnet") else "vgg"


def preset(dataset: str, arch: str, method: str) -> dict[str, Any]:
    """The paper's settings for (dataset, arch, method), as Config field values.

    Epoch-valued schedule points are given as fractions of training here and
    turned into epochs by :func:`resolve`, so that changing ``epochs`` keeps
    the shape of the schedule.
    """
    p: dict[str, Any] = dict(
        batch_size=128,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4 if _family(arch) == "resnet" else 5e-4,
        lr_decay_at=(0.5, 0.75),
        lr_decay_factor=0.1,
        score_samples_per_class=10,
        score_draws=1,
        score_batches=0,
        score_batch_size=128,
        score_chunk_size=0,
    )
    if dataset in ("cifar10", "cifar100"):
        p["epochs"] = 160
        if dataset == "cifar100" and _family(arch) == "resnet":
            p.update(score_samples_per_class=5, score_draws=2)
    elif dataset == "tiny_imagenet":
        p.update(epochs=300, score_samples_per_class=1, score_draws=10)
    elif dataset == "imagenet2012":
        p.update(
            epochs=90,
            batch_size=256,
            weight_decay=1e-4,
            lr_decay_at=(1 / 3, 2 / 3),  # every 30 of 90 epochs
            score_samples_per_class=0,
            score_draws=0,
            score_batches=150,
            score_batch_size=128,
            score_chunk_size=16,
        )
    elif dataset == "digits":
        # Not in the paper: the offline demo. 1,437 training images, 11 steps
        # per epoch at batch 128; a few hundred steps reach ~95% test accuracy.
        p.update(epochs=30)
    else:
        raise ValueError(f"no preset for dataset {dataset!r}")
    p["temperature"] = 200.0 if method == "grasp" else 1.0
    p["score_reinit_dense"] = method == "grasp"
    p["rounds"] = 100 if method == "synflow" else 1
    return p


def resolve(
    *,
    dataset: str,
    arch: Optional[str] = None,
    method: str = "grasp",
    steps_per_epoch: int,
    **overrides: Any,
) -> Config:
    """A full Config: the preset for (dataset, arch, method), then ``overrides``.

    Args:
      dataset, arch, method: what to run (``arch`` defaults per dataset).
      steps_per_epoch: training steps per epoch at the resolved batch size
        (the caller asks the input pipeline; see ``experiments.run``).
      overrides: Config fields; ``None`` values mean "use the preset".
    """
    arch = arch or DEFAULT_ARCH[dataset]
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    p = preset(dataset, arch, method)
    given = {k: v for k, v in overrides.items() if v is not None}
    batch_size = given.get("batch_size", p["batch_size"])
    if "lr" not in given:
        # Linear scaling rule: the preset's lr is quoted at its own batch size.
        given["lr"] = p["lr"] * batch_size / p["batch_size"]
    epochs = given.get("epochs", p["epochs"])
    decay_at = p.pop("lr_decay_at")
    if "lr_decay_epochs" not in given:
        # The reference decays at int(epochs * 0.5) and int(epochs * 0.75): the
        # same for every preset (160, 300, 90 epochs), but 0 for a 1-epoch run,
        # which would train at lr/100 from step 0. Fractional epochs keep the
        # decays at 50% / 75% of any schedule; rounding keeps 90 * (1/3) at 30.
        given["lr_decay_epochs"] = tuple(_whole_if_integral(round(f * epochs, 6)) for f in decay_at)
    if method == "dense":
        given["sparsity"] = 0.0
    p.update(given)
    return Config(dataset=dataset, arch=arch, method=method, steps_per_epoch=steps_per_epoch, **p)


def _whole_if_integral(x: float) -> float:
    return int(x) if float(x).is_integer() else x


def lr_boundaries(config: Config) -> dict[int, float]:
    """optax.piecewise_constant_schedule boundaries: step -> multiplicative factor."""
    out: dict[int, float] = {}
    for epoch in config.lr_decay_epochs:
        step = int(round(epoch * config.steps_per_epoch))
        out[step] = out.get(step, 1.0) * config.lr_decay_factor
    return out
