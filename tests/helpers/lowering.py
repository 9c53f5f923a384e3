"""Programs lowered for a platform from this host, and what their StableHLO holds.

``jax.export`` lowers for ``cuda`` or ``tpu`` without the hardware, so these
read what a GPU or TPU would be given. The markers of the CPU path are the
named scopes of the fusion barrier and of the patches formulation, which a
lowered module's locations carry wherever their ops are in the program.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax

from grasp_jax.models.barrier import BARRIER_SCOPE
from grasp_jax.models.conv import PATCHES_SCOPE

_MATMUL_OPS = ("convolution", "dot_general")


def exported_text(fn: Callable, *args: Any, platform: str) -> str:
    """The StableHLO (with locations) of ``jax.jit(fn)`` lowered for ``platform``."""
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    return jax.export.export(jitted, platforms=(platform,))(*args).mlir_module()


def op_count(text: str, op: str) -> int:
    """How many ``stablehlo.<op>`` the module holds."""
    return len(re.findall(rf"stablehlo\.{op}\b", text))


def has_barrier(text: str) -> bool:
    """Whether the fusion barrier's cond is in the program."""
    return re.search(rf'/{BARRIER_SCOPE}/cond"', text) is not None


def has_patches(text: str) -> bool:
    """Whether any op of the patches formulation is in the program."""
    return re.search(rf'/{PATCHES_SCOPE}/', text) is not None


def matmul_precisions(text: str) -> list[str]:
    """The precision each convolution and dot_general asks for, one string per op:
    ``'HIGHEST'`` when both operands say so, ``'DEFAULT'`` when the op names none."""
    found = []
    for line in text.splitlines():
        if not re.search(rf"stablehlo\.({'|'.join(_MATMUL_OPS)})\b", line):
            continue
        named = re.findall(r"precision(?:_config)? = \[([^\]]*)\]", line)
        if not named:
            found.append("DEFAULT")
            continue
        levels = set(re.findall(r"DEFAULT|HIGHEST|HIGH", named[0]))
        found.append(levels.pop() if len(levels) == 1 else "MIXED")
    return found
