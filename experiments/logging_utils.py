"""Console, JSON-lines and TensorBoard output of a run.

Only process 0 writes anything (files and console), so a multi-host run logs
once. A progress bar is shown when stdout is a terminal; otherwise (CI, a
batch job, a pipe) plain lines are printed at the same moments, so logs stay
readable.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping, Optional

import jax


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


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


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
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.2%}", img_s=f"{ips:.0f}",
                                 refresh=False)
        else:
            print(f"step {step}/{self.total}: loss {loss:.4f}  acc {acc:.2%}  "
                  f"{ips:.1f} img/s  lr {metrics.get('train/lr', float('nan')):.4g}  "
                  f"ETA {format_duration(eta_s)}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        _Progress.active = None


Progress = _Progress


class MetricWriter:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard event files.

    One JSON object per line: ``{"step": ..., "<split>/<name>": value, ...}``.
    On resume, :meth:`truncate_after` drops the lines a killed run wrote after
    its last checkpoint, since those steps are about to be trained again.
    """

    def __init__(self, workdir: str) -> None:
        self.enabled = is_main_process()
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            # TensorFlow (a dependency already, for the data) writes the event
            # files; the `tensorboard` package is needed only to view them.
            import tensorflow as tf
            from tensorflow.core.framework import summary_pb2

            self._tf = tf
            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
            # What tf.summary.scalar attaches, spelled out so that writing does not
            # import the tensorboard package (tensorflow-cpu does not install it).
            self._scalar_metadata = summary_pb2.SummaryMetadata(
                plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        with self._tb.as_default(step=int(step)):
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tf.summary.write(k, self._tf.constant(float(v), self._tf.float32),
                                           metadata=self._scalar_metadata)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v
