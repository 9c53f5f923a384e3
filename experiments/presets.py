"""The paper's presets, as a table: every value with its source.

Rows are keyed by dataset and architecture family (``None`` matches any) and
name their source in the paper (Wang, Zhang & Grosse, ICLR 2020) or the
authors' code (alecwangcq/GraSP; file and line in docs/PROTOCOLS.md).
:func:`preset` applies the matching rows in order, then the method
registry's own values (GraSP's temperature, SynFlow's rounds).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

from experiments import methods


class UnknownDataset(ValueError):
    """No preset row names this dataset."""


def family(arch: str) -> str:
    """``resnet`` or ``vgg`` (the small test models count as VGG-like)."""
    return "resnet" if arch.startswith("resnet") else "vgg"


class Preset(NamedTuple):
    """Values for the runs this row matches (``None`` matches anything), and their source."""

    values: Mapping[str, Any]
    source: str
    dataset: Optional[str] = None
    family: Optional[str] = None


# Applied top to bottom; a later matching row overrides an earlier one.
# Schedule points (lr_decay_at) are fractions of training, turned into epochs by resolve().
PRESETS: tuple[Preset, ...] = (
    Preset(dict(batch_size=128, lr=0.1, momentum=0.9, lr_decay_at=(0.5, 0.75),
                lr_decay_factor=0.1, score_samples_per_class=10, score_draws=1, score_batches=0,
                score_batch_size=128, score_chunk_size=0, score_reinit_layers="all"),
           "configs/*/*/GraSP_*.json: lr 0.1 decayed x0.1 at int(0.5 epochs) and "
           "int(0.75 epochs), batch 128, samples_per_class 10, num_iters 1; "
           "main_prune_non_imagenet.py:169: momentum 0.9 (docs/PROTOCOLS.md has the lines)"),
    Preset(dict(weight_decay=5e-4), "configs/*/vgg19/*.json: weight_decay 5e-4", family="vgg"),
    Preset(dict(weight_decay=1e-4), "configs/*/resnet32/*.json: weight_decay 1e-4",
           family="resnet"),
    Preset(dict(epochs=160), "paper §5.1 / configs/cifar10/*.json: 160 epochs",
           dataset="cifar10"),
    Preset(dict(epochs=160), "configs/cifar100/*.json: 160 epochs", dataset="cifar100"),
    Preset(dict(score_samples_per_class=5, score_draws=2),
           "configs/cifar100/resnet32/*.json: samples_per_class 5, num_iters 2",
           dataset="cifar100", family="resnet"),
    Preset(dict(epochs=300, score_samples_per_class=1, score_draws=10),
           "configs/tiny_imagenet/*.json: 300 epochs, samples_per_class 1, num_iters 10",
           dataset="tiny_imagenet"),
    Preset(dict(epochs=150, batch_size=256, weight_decay=1e-4, lr_decay_at=(1 / 3, 2 / 3),
                score_samples_per_class=0, score_draws=0, score_batches=150,
                score_batch_size=250, score_chunk_size=20, score_reinit_layers="last"),
           "paper §5.1 and alecwangcq/GraSP issue #5: 150 epochs, lr /10 every 50; "
           "main_finetune_imagenet.py: batch 256, wd 1e-4, lr 0.1*0.1**(epoch//(epochs//3)); "
           "main_prune_imagenet.py: num_iters 150 batches of 250; pruner/GraSP_ImageNet.py: "
           "chunks of 20, only fc_layers[-1] re-drawn", dataset="imagenet2012"),
    Preset(dict(epochs=30), "not in the paper: the offline demo; 1,437 training images, "
           "11 steps per epoch at batch 128, a few hundred steps reach ~95%", dataset="digits"),
)


def preset(dataset: str, arch: str, method: str) -> dict[str, Any]:
    """The matching rows of :data:`PRESETS`, then the method's own values."""
    if dataset not in {row.dataset for row in PRESETS}:
        raise UnknownDataset(f"no preset for dataset {dataset!r}")
    out: dict[str, Any] = {}
    for row in PRESETS:
        if row.dataset in (None, dataset) and row.family in (None, family(arch)):
            out.update(row.values)
    out.update(methods.get(method).preset)
    return out
