"""Cost of the training input pipeline: images per CPU-second, before and after.

    python -m benchmarks.input_pipeline [--datasets imagenet2012,cifar10]
        [--data_dir ../shared/tfds] [--images 1536] [--repeats 2] [--no-profile]

An accelerator is fed by host cores, so the figure that sizes a machine is the
process CPU time an image costs (``time.process_time``: every thread of the
process, tf.data's included), not wall time on a shared machine. For each
dataset, in one run, alternating ``--repeats`` times:

* ``before``: the pipeline as it was (``reference_train_dataset``): float32
  images normalized on the host (ImageNet's crop resized in float32 and
  flipped in float32), tf.data on TF's shared thread pool with ops free to
  split over its threads;
* ``after``: ``grasp_jax.data.train_dataset``: uint8 pixels (the device
  normalizes), tf.data on a private pool with one thread per op.

ImageNet is a synthetic ``imagenet2012`` written in the real manual-download
layout (tars of JPEGs at ImageNet's sizes, 333-500 x 350-500, quality 90) and
prepared by TFDS's own builder in a temporary folder, read at 224 x 224; CIFAR-10
is the copy at ``--data_dir`` (skipped if absent). Then, for ImageNet, a
per-stage profile of the ``after`` pipeline: pipelines that stop after each
stage (read, + crop window and decode, + resize, + round and flip, + batch),
each stage's cost the difference of two. The machine is printed first.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from grasp_jax import data

# ../shared/tfds beside the checkout, where the project's CIFAR-10 copy lives.
DEFAULT_DATA_DIR = str(Path(__file__).resolve().parents[1].parent / "shared" / "tfds")
# Sizes of real ImageNet training images (height, width): most are 500 on the long side.
IMAGENET_SIZES = ((375, 500), (500, 375), (333, 500), (350, 400), (400, 350), (375, 450))
JPEG_QUALITY = 90
DISTINCT_PICTURES = 96


# ---------------------------------------------------------------------------
# The machine.


def machine() -> str:
    """CPU model, the cores this process may use, and the library versions."""
    import tensorflow as tf

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = data.streams.host_cores()
    return (
        f"{model}, {cores} cores available to this process ({os.cpu_count()} on the machine), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"TensorFlow {tf.__version__}"
    )


# ---------------------------------------------------------------------------
# A synthetic imagenet2012 in the manual-download layout.


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3]: smooth colour regions with edges and grain, so that JPEG
    decoding costs about what a photograph's does (not flat, not white noise)."""
    import tensorflow as tf

    coarse = rng.uniform(0, 255, (1, height // 24 + 2, width // 24 + 2, 3)).astype(np.float32)
    smooth = tf.image.resize(coarse, [height, width], method="bicubic")[0].numpy()
    edges = rng.uniform(0, 255, (1, height // 6 + 1, width // 6 + 1, 3)).astype(np.float32)
    blocky = tf.image.resize(edges, [height, width], method="nearest")[0].numpy()
    grain = rng.normal(0.0, 8.0, (height, width, 3))
    return np.clip(0.7 * smooth + 0.3 * blocky + grain, 0, 255).astype(np.uint8)


def _tar_add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(payload)
    tar.addfile(member, io.BytesIO(payload))


def write_imagenet(data_dir: Path, num_train: int, seed: int = 0) -> None:
    """``num_train`` training JPEGs (and 8 validation ones) as ImageNet's manual download,
    prepared into ``data_dir`` by TFDS's own imagenet2012 builder."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(seed)
    folder = tfds.core.tfds_path("datasets/imagenet2012")
    synsets = (folder / "labels.txt").read_text().split()
    val_synsets = (folder / "validation_labels.txt").read_text().split()[:8]
    wnids = sorted(set(val_synsets), key=synsets.index)

    # Distinct pictures, reused: decoding costs the same, and writing takes seconds.
    pictures = [
        tf.io.encode_jpeg(photo_like(rng, *size), quality=JPEG_QUALITY).numpy()
        for _ in range(DISTINCT_PICTURES // len(IMAGENET_SIZES))
        for size in IMAGENET_SIZES
    ]

    def jpeg(i: int) -> bytes:
        return pictures[i % len(pictures)]

    manual = data_dir / "downloads" / "manual"
    manual.mkdir(parents=True, exist_ok=True)
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train:
        per_class = -(-num_train // len(wnids))
        for c, wnid in enumerate(wnids):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as synset:
                for i in range(per_class):
                    _tar_add(synset, f"{wnid}_{i}.JPEG", jpeg(c * per_class + i))
            _tar_add(train, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(len(val_synsets)):
            _tar_add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg(i))
    builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(manual), compute_stats=tfds.download.ComputeStatsMode.SKIP
        )
    )


# ---------------------------------------------------------------------------
# The pipeline before: float32 on the host, TF's shared pool.


def reference_train_dataset(
    info: data.DatasetInfo, *, global_batch_size: int, seed: int, data_dir: str | None
):
    """The training stream as it was before uint8 batches and tf.data's own pool.

    The same stream (order, crops, flips) as ``data.train_dataset`` on one
    process and one device, but float32 images normalized on the host, and only
    tf.data's determinism option set.
    """
    import tensorflow as tf

    from grasp_jax.data import augment, in_memory, seeds, streams

    source = in_memory.pipeline_source(info, info.train_split, data_dir, 0, 1, True)
    key = seeds.stream_key(seed, 0)
    steps = streams.training_steps(source.num_examples, global_batch_size, info)
    buffer_size = info.shuffle_buffer_size or source.num_examples
    read = streams.epoch_reader(source, source.dataset, buffer_size)
    ds = tf.data.Dataset.range(0, np.iinfo(np.int64).max).flat_map(
        lambda e: streams.epoch_examples(read, key, e, buffer_size, steps * global_batch_size)
    )
    ds = augment.augmented_batches(
        info, ds, source.image_format, key, global_batch_size, normalize=True
    )
    options = tf.data.Options()
    options.deterministic = True
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def current_train_dataset(
    info: data.DatasetInfo, *, global_batch_size: int, seed: int, data_dir: str | None
):
    """``data.train_dataset`` on one process and one device."""
    return data.train_dataset(
        info,
        global_batch_size=global_batch_size,
        seed=seed,
        data_dir=data_dir,
        process_index=0,
        process_count=1,
        local_device_count=1,
    )


# ---------------------------------------------------------------------------
# Measuring.


def cpu_cost(batches: Iterator, batch_size: int, num_images: int, warmup: int = 3) -> dict:
    """Images per CPU-second and per wall second over ``num_images`` after ``warmup`` batches.

    Process CPU time counts every thread (tf.data's pool, autotuning, the
    consumer's copy out of TF), so it is the host cost of the images whatever
    else the machine runs.
    """
    for _ in range(warmup):
        next(batches)
    steps = max(1, num_images // batch_size)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        next(batches)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    images = steps * batch_size
    return {"per_cpu_s": images / cpu, "per_s": images / wall, "images": images}


def compare(
    info: data.DatasetInfo, data_dir: str | None, batch_size: int, num_images: int, repeats: int
) -> dict[str, dict]:
    """Best of ``repeats`` alternating runs of the pipeline before and after (one process)."""
    builders: dict[str, Callable] = {
        "before": reference_train_dataset,
        "after": current_train_dataset,
    }
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for name, build in builders.items():
            ds = build(info, global_batch_size=batch_size, seed=0, data_dir=data_dir)
            result = cpu_cost(ds.as_numpy_iterator(), batch_size, num_images)
            if name not in best or result["per_cpu_s"] > best[name]["per_cpu_s"]:
                best[name] = result
    return best


def stage_pipelines(info: data.DatasetInfo, data_dir: str, batch_size: int) -> dict[str, Callable]:
    """ImageNet's ``after`` pipeline cut after each stage, as stage name -> dataset builder.

    Each pipeline reads the records in their stored order and maps one
    function that stops after its stage; all but the last batch only a scalar
    per image, so that no stage's output is copied needlessly.
    """
    import tensorflow as tf

    from grasp_jax.data import augment, seeds, sources, streams

    source = sources.load_source(info, info.train_split, data_dir, 0, 1, drop_remainder=True)
    size = info.image_shape[0]
    key = seeds.stream_key(0, 0)

    def box_seed(index):
        seed = seeds.augment_seed(key, 0, index)
        return tf.random.experimental.stateless_split(seed, 2)[0]

    def read(index, ex):
        return tf.strings.length(ex["image"])

    def decode(index, ex):
        window = augment.crop_window(ex["image"], box_seed(index))
        return tf.reduce_max(tf.image.decode_and_crop_jpeg(ex["image"], window, channels=3))

    def resize(index, ex):
        window = augment.crop_window(ex["image"], box_seed(index))
        image = tf.image.decode_and_crop_jpeg(ex["image"], window, channels=3)
        image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
        return tf.reduce_max(image)

    def round_flip(index, ex):
        seed = seeds.augment_seed(key, 0, index)
        return tf.reduce_max(augment.random_resized_crop_flip_pixels(ex["image"], seed, size))

    def pipeline(stage: Callable) -> Callable[[], tf.data.Dataset]:
        def build() -> tf.data.Dataset:
            ds = source.dataset.repeat().enumerate()
            ds = ds.map(stage, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            return streams.deterministic(ds.batch(batch_size).prefetch(tf.data.AUTOTUNE))

        return build

    def full() -> tf.data.Dataset:
        return current_train_dataset(info, global_batch_size=batch_size, seed=0, data_dir=data_dir)

    return {
        "read (records, parse)": pipeline(read),
        "decode + crop (window from the header)": pipeline(decode),
        "resize (antialiased bilinear, float32)": pipeline(resize),
        "round to uint8 + flip": pipeline(round_flip),
        "shuffle + batch + copy out (the whole pipeline)": full,
    }


def profile(info: data.DatasetInfo, data_dir: str, batch_size: int, num_images: int) -> None:
    """Prints the CPU time per image of each stage of ImageNet's ``after`` pipeline."""
    print(f"  per-stage profile of 'after' (CPU ms per image; {num_images} images each):")
    previous = 0.0
    for stage, build in stage_pipelines(info, data_dir, batch_size).items():
        result = cpu_cost(build().as_numpy_iterator(), batch_size, num_images)
        cumulative = 1000.0 / result["per_cpu_s"]
        print(f"    {stage:48s} {cumulative - previous:6.2f}   (cumulative {cumulative:6.2f})")
        previous = cumulative


def report(name: str, best: dict[str, dict], batch_size: int) -> None:
    before, after = best["before"], best["after"]
    print(f"{name}, batch {batch_size}, best of the repeats, {after['images']} images each:")
    for label, result in (("before", before), ("after", after)):
        print(
            f"  {label:6s} {result['per_cpu_s']:9,.0f} images per CPU-second "
            f"({result['per_s']:,.0f} images/s wall)"
        )
    print(f"  after / before: {after['per_cpu_s'] / before['per_cpu_s']:.2f}x per CPU-second")


def pipeline_images_per_second(
    dataset: str = "cifar10",
    *,
    data_dir: str | None = DEFAULT_DATA_DIR,
    global_batch_size: int = 128,
    skip_steps: int = 0,
    num_steps: int | None = None,
    seed: int = 0,
) -> float:
    """Images per (wall) second delivered by ``data.train_dataset`` over ``num_steps`` steps.

    The clock starts after ``skip_steps`` batches have been consumed (0 times
    the pipeline's start-up, including filling the shuffle buffer); by default
    ``num_steps`` is one epoch.
    """
    if num_steps is None:
        num_steps = data.steps_per_epoch(
            dataset, global_batch_size, data_dir=data_dir, process_count=1
        )
    batches = current_train_dataset(
        data.get_info(dataset), global_batch_size=global_batch_size, seed=seed, data_dir=data_dir
    ).as_numpy_iterator()
    start = time.perf_counter()
    for step in range(skip_steps + num_steps):
        if step == skip_steps:
            start = time.perf_counter()
        next(batches)
    return num_steps * global_batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="imagenet2012,cifar10")
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="where CIFAR-10 is")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--images", type=int, default=1536, help="ImageNet images per run")
    parser.add_argument("--cifar_images", type=int, default=40_960)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    names = args.datasets.split(",")
    if "imagenet2012" in names:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            # Twice the images measured, so the shuffle buffer's fill is not what is timed.
            write_imagenet(Path(folder), 2 * args.images + 4 * args.batch_size)
            print(f"(synthetic imagenet2012 written and prepared in "
                  f"{time.perf_counter() - start:.0f} s)")
            info = data.get_info("imagenet2012")
            best = compare(info, folder, args.batch_size, args.images, args.repeats)
            report("imagenet2012 at 224 x 224 (synthetic JPEGs)", best, args.batch_size)
            if args.profile:
                profile(info, folder, args.batch_size, args.images)
    if "cifar10" in names:
        if not (Path(args.data_dir) / "cifar10").is_dir():
            print(f"cifar10: skipped, no copy at {args.data_dir}")
        else:
            info = data.get_info("cifar10")
            best = compare(info, args.data_dir, args.batch_size, args.cifar_images, args.repeats)
            report("cifar10 at 32 x 32 (decoded once, held in memory)", best, args.batch_size)


if __name__ == "__main__":
    main()
