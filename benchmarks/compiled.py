"""What XLA says about a compiled program: its peak memory and its FLOP count.

Both are estimates from the compiler (``memory_analysis``, ``cost_analysis``),
so they do not depend on how loaded the machine is. ``None`` where a backend
does not report them.
"""

from __future__ import annotations

from typing import Any


def peak_bytes(compiled: Any) -> int | None:
    """Arguments + outputs + temporaries - aliased, in bytes."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # some backends/versions do not implement it
        return None
    if ma is None:
        return None
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes)


def flops(compiled: Any) -> float | None:
    """Floating-point operations of one call."""
    try:
        ca = compiled.cost_analysis()
    except Exception:
        return None
    ca = ca[0] if isinstance(ca, (list, tuple)) and ca else ca
    return float(ca["flops"]) if ca and ca.get("flops") else None
