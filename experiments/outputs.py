"""A run's and a sweep's small outputs: files written atomically, plots without
a display, durations as people read them.

Every file goes to a temporary name and is renamed onto its path (or, on an
object store, is one whole-object write: ``experiments.paths``), so a reader
(or a process killed mid-write) never sees half a file. Only the standard
library here (matplotlib is imported on first use), so that
``experiments.sweep --report_only`` can use it without loading JAX or orbax.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, BinaryIO

from experiments import paths


def write_bytes_with(path: str, writer: Callable[[BinaryIO], Any]) -> None:
    """``writer(file)`` into a temporary file, then rename onto ``path`` (one object
    write on ``gs://`` / ``s3://``)."""
    paths.write_bytes_with(path, writer)


def write_text(path: str, text: str) -> None:
    paths.write_text(path, text)


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


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (hours unbounded), rounded to the second; ``?`` for NaN or inf."""
    if not math.isfinite(seconds):
        return "?"
    h, rest = divmod(round(float(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def format_rate(per_second: float) -> str:
    """A throughput with one decimal; ``n/a`` for NaN (no step timed yet: the first,
    compiling step is not training time)."""
    return f"{per_second:.1f}" if math.isfinite(per_second) else "n/a"


def save_layer_bars(fig: Any, ax: Any, path: str, layers: list[str], *, ylabel: str,
                    title: str, legend_loc: str = "best") -> None:
    """Finish a per-layer density bar chart (layer names under the bars, densities in
    [0, 1], a legend) and save it as a PNG at ``path``."""
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=75, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc=legend_loc, fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
