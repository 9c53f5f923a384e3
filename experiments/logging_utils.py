"""Console output of a run: log lines and progress.

Only process 0 writes anything (files and console), so a multi-host run logs
once. A progress bar is shown when stdout is a terminal; otherwise (CI, a
batch job, a pipe) plain lines are printed at the same moments, so logs stay
readable.

Why none of clu's periodic actions (``clu.periodic_actions``, clu 0.0.12) drives this:

* ``PeriodicCallback`` (and the ``PeriodicAction`` it is): the plain lines are not on a
  clock. They are printed where the training loop has just fetched its window of metrics
  from the devices (``train.Cadence.log``: every ``--log_every_steps``, at every
  evaluation and checkpoint, and when a signal stops the run), and show those values.
  An ``every_secs`` trigger would print at steps that depend on the wall clock (another
  console, and either stale values or one more device fetch per line); its step trigger
  is ``step % every_steps == 0`` or a fixed ``on_steps`` set, which cannot say that
  orbax's save policy wants a checkpoint or that a signal arrived. ``Cadence`` is a
  function of the step alone; the action would add state and decide nothing new.
* ``ReportProgress``: its steps/s is steps over wall time since its last report, so it
  counts evaluation, checkpointing and the first (compiling) step, which the run clock
  (``experiments.clock.Chrono``) leaves out of the throughput and ETA shown here; two
  rates would disagree. ``timed("eval")`` / ``timed("checkpoint")`` take nothing out of
  that rate: they only add a percentage breakdown to the work unit's notes, which it
  sends to absl's INFO log (dropped: absl logs WARNING and above outside ``absl.app``)
  and returns neither rate nor ETA. With ``writer=`` it writes ``steps_per_sec`` and
  ``uptime`` in two separate writes (two more metrics.jsonl records each time, on a
  60 s clock by default), and its ``uptime`` restarts at every resume, while the run's
  ``wall_time_s`` (results.json, every checkpoint) carries on. What it would add is
  either already written (``train/images_per_sec``, ``wall_time_s``) or not the run's.
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
