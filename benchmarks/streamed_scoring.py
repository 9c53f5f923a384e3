"""Host memory and time of streamed GraSP scoring as the number of batches grows.

    python -m benchmarks.streamed_scoring [--num_batches 10,50,150] [--image_size 32]
        [--batch_size 50] [--microbatch_size 20] [--data_dir DIR]

ImageNet's protocol scores ResNet-50 on 150 batches of 250 images in chunks of
20 (12 x 20 + 10), streamed by ``grasp_jax.grasp_scores_from_batches``: two
passes (g, then Hg), one batch on the host and one chunk on the device at a
time. So peak host memory should not grow with the number of batches, and
time should grow linearly. Each size runs in a fresh subprocess (peak RSS,
``ru_maxrss``, only ever grows within a process); each first scores one batch
to compile (or load from JAX's persistent cache), then the timed stream.

The defaults take about 10 minutes on 2 shared CPU cores (docs/STREAMING.md
has a run). Batches are synthetic, regenerated from (seed, batch index) by a seeded
generator, hence restartable; with ``--data_dir`` they are instead
``grasp_jax.data.scoring_stream`` over an ``imagenet2012`` prepared there.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np

Batch = dict[str, np.ndarray]
NUM_CLASSES = 1000


def synthetic_stream(
    num_batches: int, batch_size: int, image_size: int, seed: int
) -> Callable[[], Iterator[Batch]]:
    """``make_batches()``: batch i drawn from ``default_rng([seed, i])``, the same every pass."""

    def make_batches() -> Iterator[Batch]:
        for i in range(num_batches):
            rng = np.random.default_rng([seed, i])
            yield {
                "image": rng.standard_normal(
                    (batch_size, image_size, image_size, 3), dtype=np.float32
                ),
                "label": rng.integers(0, NUM_CLASSES, batch_size, dtype=np.int32),
            }

    return make_batches


def _stream(args: argparse.Namespace, num_batches: int) -> Callable[[], Iterator[Batch]]:
    if args.data_dir is None:
        return synthetic_stream(num_batches, args.batch_size, args.image_size, args.seed)
    from grasp_jax import data

    info = data.get_info("imagenet2012", image_size=args.image_size)
    return data.scoring_stream(
        info, num_batches, args.batch_size, seed=args.seed, data_dir=args.data_dir
    )


def peak_rss_mib() -> float:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args: argparse.Namespace, num_batches: int) -> dict:
    """Scores ``num_batches`` batches once (after a one-batch warm-up); peak RSS and seconds."""
    from experiments import jax_cache

    jax_cache.enable()
    import jax

    import grasp_jax as gj
    from grasp_jax import models

    from experiments import data_scoring, steps

    model = models.get_model("resnet50", NUM_CLASSES)
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(args.seed))
    shape = (args.image_size, args.image_size, 3)
    variables = steps.init_variables(model, init_key, shape)
    loss_fn = data_scoring.make_loss_fn(model, variables["batch_stats"], 1.0, dropout_key)

    def score(make_batches):
        scores = gj.grasp_scores_from_batches(
            variables["params"], loss_fn, make_batches, microbatch_size=args.microbatch_size
        )
        return jax.block_until_ready(scores)

    score(_stream(args, 1))  # compile (or load the compiled programs)
    warm_rss = peak_rss_mib()
    start = time.perf_counter()
    score(_stream(args, num_batches))
    seconds = time.perf_counter() - start
    return {
        "num_batches": num_batches,
        "seconds": seconds,
        "warm_peak_rss_mib": warm_rss,
        "peak_rss_mib": peak_rss_mib(),
        "backend": jax.default_backend(),
    }


def _flags(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_batches", default="10,50,150", help="comma-separated sizes")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=50, help="the paper: 250")
    parser.add_argument("--microbatch_size", type=int, default=20, help="the paper: 20")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=None, help="imagenet2012 TFDS dir (else synthetic)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _child_command(argv: list[str], num_batches: int) -> list[str]:
    return [sys.executable, "-m", "benchmarks.streamed_scoring", *argv, "--one", str(num_batches)]


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = _flags(argv)
    if args.one is not None:  # a child: one size, result as the last line of stdout
        print(json.dumps(measure(args, args.one)), flush=True)
        return []
    sizes = [int(n) for n in args.num_batches.split(",")]
    chunks = -(-args.batch_size // args.microbatch_size)
    print(
        f"ResNet-50, {args.image_size}x{args.image_size} images, batches of {args.batch_size} "
        f"in {chunks} chunks of <= {args.microbatch_size}, "
        f"{'synthetic' if args.data_dir is None else args.data_dir} data; "
        f"{platform.node()}, {platform.processor() or platform.machine()}",
        flush=True,
    )
    rows = []
    for n in sizes:
        done = subprocess.run(_child_command(argv, n), capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"num_batches={n} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(
            f"  {n} batches: {row['seconds']:.1f} s, peak RSS {row['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    print()
    print("| batches | images | wall s | s / batch | peak RSS MiB | RSS after warm-up MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        n = row["num_batches"]
        print(
            f"| {n} | {n * args.batch_size:,} | {row['seconds']:.1f} | "
            f"{row['seconds'] / n:.2f} | {row['peak_rss_mib']:.0f} | "
            f"{row['warm_peak_rss_mib']:.0f} |"
        )
    return rows


if __name__ == "__main__":
    main()
