"""The precision every data-dependent score computes its matmuls and convolutions at.

Accelerators trade float32 accuracy for speed by default: a TPU runs a float32
matmul or convolution as one bfloat16 pass, and recent NVIDIA GPUs use
TensorFloat-32 (a 10-bit mantissa). Scores rank millions of weights against
each other, and GraSP's Hg is a second derivative, so those defaults change
which weights are kept (ResNet-32 scored in bfloat16: scores correlated 0.906
with float32's, ~80% of the same weights kept at 90% and 98% sparsity).

So scoring traces its programs under ``jax.default_matmul_precision``, which
sets the precision of every ``dot_general`` and convolution that does not
name its own (the models' layers do not) to the value given: ``"float32"``
(the default here) lowers each to ``precision_config = HIGHEST`` on every
backend. The setting is part of jit's cache key, so a program traced at one
precision is never reused at another. On CPU, float32 is what XLA computes
anyway: scores are bit-identical either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

#: The default ``matmul_precision`` of every data-dependent score.
SCORING_PRECISION = "float32"

# The names jax.default_matmul_precision accepts for a whole precision level;
# the algorithm presets ('BF16_BF16_F32', ...) are accepted too.
_LEVELS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


def check_matmul_precision(value: str | None) -> str | None:
    """``value`` if ``jax.default_matmul_precision`` accepts it (or it is None); a
    ValueError naming it otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            with jax.default_matmul_precision(value):
                return value
        except ValueError:
            pass
    raise ValueError(
        f"matmul_precision={value!r}; expected None (the backend's default) or one of "
        f"{', '.join(map(repr, _LEVELS))} (or a lax.DotAlgorithmPreset name)")


@contextlib.contextmanager
def precision_scope(value: str | None) -> Iterator[None]:
    """Trace inside at ``value`` (see the module docstring); None leaves the backend's
    default (and any enclosing ``jax.default_matmul_precision``) in force."""
    if value is None:
        yield
        return
    with jax.default_matmul_precision(value):
        yield
