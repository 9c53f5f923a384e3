"""Throughput of the training input pipeline (decode + augment + batch).

    python -m benchmarks.input_pipeline [--dataset cifar10] [--data_dir ../shared/tfds]

Prints images/second for the first epoch (decodes every image; for CIFAR the
decoded images are then cached) and for the second epoch (augment + batch from
the cache). Batches stay on the host: this measures the pipeline alone, with
the device count fixed at 1 so the figure does not depend on the accelerator.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from grasp_jax import data

# ../shared/tfds beside the checkout, where the project's CIFAR-10 copy lives.
DEFAULT_DATA_DIR = str(Path(__file__).resolve().parents[1].parent / "shared" / "tfds")


def pipeline_images_per_second(
    dataset: str = "cifar10",
    *,
    data_dir: str | None = DEFAULT_DATA_DIR,
    global_batch_size: int = 128,
    skip_steps: int = 0,
    num_steps: int | None = None,
    seed: int = 0,
) -> float:
    """Images per second delivered by ``data.train_dataset`` over ``num_steps`` steps.

    The clock starts after ``skip_steps`` batches have been consumed (0 times
    the pipeline's start-up, including filling the shuffle buffer); by default
    ``num_steps`` is one epoch.
    """
    if num_steps is None:
        num_steps = data.steps_per_epoch(
            dataset, global_batch_size, data_dir=data_dir, process_count=1
        )
    batches = data.train_dataset(
        dataset,
        global_batch_size=global_batch_size,
        seed=seed,
        data_dir=data_dir,
        process_index=0,
        process_count=1,
        local_device_count=1,
    ).as_numpy_iterator()
    start = time.perf_counter()
    for step in range(skip_steps + num_steps):
        if step == skip_steps:
            start = time.perf_counter()
        next(batches)
    return num_steps * global_batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10", choices=data.dataset_names())
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--batch_size", type=int, default=128)
    args = parser.parse_args()
    steps = data.steps_per_epoch(
        args.dataset, args.batch_size, data_dir=args.data_dir, process_count=1
    )
    common = dict(data_dir=args.data_dir, global_batch_size=args.batch_size, num_steps=steps)
    first = pipeline_images_per_second(args.dataset, **common)
    second = pipeline_images_per_second(args.dataset, skip_steps=steps, **common)
    print(f"{args.dataset} training pipeline, batch {args.batch_size}, {steps} steps/epoch:")
    print(f"  first epoch (decode + augment + batch): {first:,.0f} images/s")
    print(f"  later epochs (augment + batch, decoded images cached): {second:,.0f} images/s")


if __name__ == "__main__":
    main()
