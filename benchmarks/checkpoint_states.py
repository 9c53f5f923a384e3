"""States shaped like a run's checkpoint, for the checkpoint benchmarks (numpy only, so a
benchmark can build one before it imports anything that talks to storage)."""

from __future__ import annotations

import numpy as np


def run_like_state(n: int, rng: np.random.Generator) -> dict:
    """``n`` float32 parameters in leaves of up to 2**20, with momentum of the same shapes,
    boolean masks and a step counter: what ``experiments.train`` saves."""
    chunk = 1 << 20
    leaves = -(-n // chunk)
    params = {f"layer{i}": rng.standard_normal(min(chunk, n - i * chunk), np.float32)
              for i in range(leaves)}
    return {"params": params, "momentum": {k: v * 0.5 for k, v in params.items()},
            "masks": {k: v > 0 for k, v in params.items()}, "step": np.asarray(1, np.int32)}
