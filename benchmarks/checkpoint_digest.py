"""Cost of the checkpoint digest: save and restore with and without it.

    python -m benchmarks.checkpoint_digest [--repeats 3]

States shaped like a run's (parameters, momentum, boolean masks) at the sizes
of VGG19 (CIFAR-10) and ResNet-50 (ImageNet), random float32 values. Prints
the seconds of each and the ratio with/without the digest, all from one run.
Save time is until the checkpoint is on disk (orbax's background write waited for).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from benchmarks.checkpoint_states import run_like_state
from experiments import checkpointing

# Parameter counts of the networks' prunable and other leaves (approximate layer split).
SIZES = {"vgg19": 20_035_018, "resnet50": 25_557_032}


def measure(state: dict, digest: bool, repeats: int) -> tuple[float, float]:
    saves, restores = [], []
    for r in range(repeats):
        with tempfile.TemporaryDirectory() as d:
            ckpt = checkpointing.Checkpointer(d, max_to_keep=1)

            start = time.perf_counter()
            ckpt.save(1, state, {"r": r}, digest=digest)
            ckpt.wait()
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            ckpt.restore(1, state, verify=digest)
            restores.append(time.perf_counter() - start)
            ckpt.close()
    return min(saves), min(restores)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'state':<10}{'MB':>8}{'save s':>9}{'+digest':>9}{'ratio':>7}"
          f"{'restore s':>11}{'+digest':>9}{'ratio':>7}")
    for name, n in SIZES.items():
        state = run_like_state(n, rng)
        mb = sum(x.nbytes for x in __import__("jax").tree_util.tree_leaves(state)) / 2**20
        s0, r0 = measure(state, False, args.repeats)
        s1, r1 = measure(state, True, args.repeats)
        print(f"{name:<10}{mb:>8.0f}{s0:>9.2f}{s1:>9.2f}{s1 / s0:>7.2f}"
              f"{r0:>11.2f}{r1:>9.2f}{r1 / r0:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
