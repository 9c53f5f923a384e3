"""Writing a run's small output files: atomically, and plots without a display.

Every file goes to a temporary name and is renamed onto its path, so a reader
(or a process killed mid-write) never sees half a file. Only the standard
library here (matplotlib is imported on first use), so that
``experiments.sweep --report_only`` can use it without loading JAX or orbax.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO, Callable


def _tmp(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def write_bytes_with(path: str, writer: Callable[[BinaryIO], Any]) -> None:
    """``writer(file)`` into a temporary file, then rename onto ``path``."""
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        writer(f)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    write_bytes_with(path, lambda f: f.write(text.encode()))


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # No display; must precede pyplot.
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str) -> None:
    """``fig`` as a PNG at ``path`` (atomically), then closed."""
    write_bytes_with(path, lambda f: fig.savefig(f, format="png", dpi=120))
    pyplot().close(fig)
