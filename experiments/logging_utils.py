"""Console output of a run: log lines and progress.

Only process 0 writes anything (files and console), so a multi-host run logs
once. A progress bar is shown when stdout is a terminal; otherwise (CI, a
batch job, a pipe) plain lines are printed at the same moments, so logs stay
readable.

Why not ``clu.periodic_actions.ReportProgress``: it sends its rate and ETA to the
work unit's notes (absl logging outside Google's platform) and returns neither, and
its rate counts evaluation and checkpointing time, which the run clock
(``experiments.clock.Chrono``) leaves out of the throughput and ETA shown here.
"""

from __future__ import annotations

import sys
from typing import Mapping, Optional

import jax

from experiments.outputs import format_duration, format_rate


def is_main_process() -> bool:
    return jax.process_index() == 0


def log(message: str) -> None:
    """Print on process 0; goes above an active progress bar."""
    if not is_main_process():
        return
    if _Progress.active is not None:
        _Progress.active.write(message)
    else:
        print(message, flush=True)


class _Progress:
    """A tqdm bar on a terminal, periodic plain lines elsewhere."""

    active: Optional["_Progress"] = None

    def __init__(self, total: int, initial: int, use_bar: Optional[bool] = None) -> None:
        self.total, self.step = total, initial
        self.enabled = is_main_process()
        self.use_bar = self.enabled and (sys.stdout.isatty() if use_bar is None else use_bar)
        self.bar = None
        if self.use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            file=sys.stdout, leave=True)
        _Progress.active = self if self.use_bar else None

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.step)
        self.step = step

    def report(self, step: int, metrics: Mapping[str, float], eta_s: float) -> None:
        """Show the latest training metrics (bar postfix, or one line)."""
        if not self.enabled:
            return
        loss, acc, ips = metrics.get("train/loss"), metrics.get("train/accuracy"), metrics.get(
            "train/images_per_sec")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.2%}", img_s=format_rate(ips),
                                 refresh=False)
        else:
            print(f"step {step}/{self.total}: loss {loss:.4f}  acc {acc:.2%}  "
                  f"{format_rate(ips)} img/s  lr {metrics.get('train/lr', float('nan')):.4g}  "
                  f"ETA {format_duration(eta_s)}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        _Progress.active = None


Progress = _Progress
