"""A run's metrics: the window of training steps not yet fetched, and where they are written.

:class:`MetricsWindow` holds the device metrics of recent steps (fetching
every step would synchronize host and device) and turns them into means when
the loop reports; it also finds the first step whose loss or gradients were
not finite. :class:`MetricWriter` appends to ``metrics.jsonl`` and, through
clu's ``metric_writers.SummaryWriter``, to TensorBoard event files; on resume
it drops from both what a killed run wrote after its last checkpoint, so
every step has one record.

Why the events past the checkpoint are dropped here rather than left to
TensorBoard: its loader (2.21) purges "orphaned" steps of a restarted run only
at a ``SessionLog.START`` event in files of version 2 (the only kind TF2's
summary writers, clu's included, produce, and they never write that event), so
a resumed run's repeated steps would show twice. A resumed run's writer opens a
new event file beside the old ones (clu names each by its start time); the old
ones are rewritten without the events past the checkpoint.

On an object store (a ``gs://`` or ``s3://`` workdir) nothing can be appended
to: the writer keeps ``metrics.jsonl``'s lines in memory and rewrites the
whole object (one atomic PUT: a reader sees the old or the new file, never half
a line), and TensorBoard events go to a local temporary directory whose files
are uploaded whole. A rewrite at every write would make a long run's uploads
quadratic, on process 0's training loop (90 ImageNet epochs logged every 50
steps: ~9,000 records, each upload up to the whole ~3 MB file), so the records
go up at most every :data:`REMOTE_RECORDS_EVERY_S` seconds (the first at once,
so a run shows up), and both files at every flush: each evaluation and each
checkpoint save, and at the end. Records a kill loses are those past the last
checkpoint, which a resume drops anyway. Truncation on resume reads the object,
drops the records past the checkpoint and writes it back.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time
from typing import Any, Mapping, Optional

import numpy as np

from experiments import distributed, paths
from experiments.logging_utils import is_main_process
from experiments.outputs import write_text


class MetricsWindow:
    """Train metrics of the steps since the last report, and running epoch sums."""

    def __init__(self) -> None:
        self._steps: list[int] = []
        self._pending: list[Any] = []
        self._epoch = {"loss": 0.0, "accuracy": 0.0, "n": 0}

    def add(self, step: int, device_metrics: Any) -> None:
        self._steps.append(step)
        self._pending.append(device_metrics)

    def __len__(self) -> int:
        return len(self._pending)

    def flush(self) -> tuple[Optional[dict[str, float]], Optional[int]]:
        """(means of the window, the first step that was not finite or None);
        (None, None) when the window is empty."""
        if not self._pending:
            return None, None
        fetched = distributed.first_replica(self._pending)
        steps, self._steps, self._pending = self._steps, [], []
        bad = [s for s, m in zip(steps, fetched) if not float(m["finite"])]
        losses = [float(m["loss"]) for m in fetched]
        accs = [float(m["accuracy"]) for m in fetched]
        self._epoch["loss"] += sum(losses)
        self._epoch["accuracy"] += sum(accs)
        self._epoch["n"] += len(losses)
        means = {"train/loss": float(np.mean(losses)), "train/accuracy": float(np.mean(accs))}
        return means, (bad[0] if bad else None)

    def epoch(self) -> dict[str, float]:
        """Means over the epoch's reported steps, and a fresh epoch."""
        n = max(self._epoch["n"], 1)
        out = {"train/epoch_loss": self._epoch["loss"] / n,
               "train/epoch_accuracy": self._epoch["accuracy"] / n}
        self._epoch = {"loss": 0.0, "accuracy": 0.0, "n": 0}
        return out


# How often, at most, a remote metrics.jsonl is rewritten between flushes: a minute of
# progress to watch from the bucket, a bounded cost per run.
REMOTE_RECORDS_EVERY_S = 60.0
_now = time.monotonic


class MetricWriter:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard event files (process 0 only).

    One JSON object per line: ``{"step": ..., "<split>/<name>": value, ...}``. The
    file is our own, beside clu's writers, because resuming needs one record per step
    that can be cut back to the checkpoint and read by the sweep; TensorBoard's event
    files are clu's (``metric_writers.SummaryWriter``).
    """

    def __init__(self, workdir: str) -> None:
        self.enabled = is_main_process()
        self.path = paths.join(workdir, "metrics.jsonl")
        self.tb_dir = paths.join(workdir, "tensorboard")
        self._tb = None
        self.remote = paths.is_url(workdir)
        self._lines: Optional[list[str]] = None  # metrics.jsonl as written so far (remote only)
        self._records_uploaded_at = -float("inf")  # _now() at the last rewrite
        self._records_pending = False  # lines not yet in the remote object
        self._event_bytes_uploaded: dict[str, int] = {}  # event file name -> size uploaded
        # On an object store TensorFlow writes its events here; flush() uploads them.
        self._local_tb = tempfile.mkdtemp(prefix="grasp-jax-tb-") if self.remote else None

    def _writer(self):
        if self._tb is None:
            from clu import metric_writers

            self._tb = metric_writers.SummaryWriter(self._local_tb or self.tb_dir)
        return self._tb

    def truncate_after(self, step: int) -> None:
        """Drop every record past ``step`` (written by a run killed after its last checkpoint)."""
        if not self.enabled:
            return
        if paths.exists(self.path):
            kept = []
            for line in paths.read_text(self.path).splitlines(keepends=True):
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
            write_text(self.path, "".join(kept))
            if self.remote:
                self._lines = kept
        if self.remote:
            _truncate_remote_event_files(self.tb_dir, step)
        else:
            _truncate_event_files(self.tb_dir, step)

    def _append(self, line: str) -> None:
        if not self.remote:
            with open(self.path, "a") as f:
                f.write(line)
            return
        if self._lines is None:  # a fresh run, or one that never truncated
            self._lines = (paths.read_text(self.path).splitlines(keepends=True)
                           if paths.exists(self.path) else [])
        self._lines.append(line)
        self._records_pending = True
        if _now() - self._records_uploaded_at >= REMOTE_RECORDS_EVERY_S:
            self._upload_records()

    def _upload_records(self) -> None:
        if self._records_pending:
            write_text(self.path, "".join(self._lines))
            self._records_pending = False
            self._records_uploaded_at = _now()

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._append(json.dumps(record) + "\n")
        scalars = {k: float(v) for k, v in record.items()
                   if k in metrics and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            self._writer().write_scalars(int(step), scalars)

    def flush(self) -> None:
        if not self.enabled:
            return
        self._upload_records()
        if self._tb is not None:
            self._tb.flush()
            self._upload_events()

    def close(self) -> None:
        if not self.enabled:
            return
        self._upload_records()
        if self._tb is not None:
            self._tb.close()
            self._upload_events()

    def _upload_events(self) -> None:
        """Copy each local event file that grew since its last upload whole to the workdir's
        ``tensorboard/`` (remote only). Event files are only appended to, so an unchanged
        size is an unchanged file: a flush right after another (an evaluation and a
        checkpoint at the same step) uploads nothing again."""
        if self._local_tb is None:
            return
        for name in sorted(os.listdir(self._local_tb)):
            with open(os.path.join(self._local_tb, name), "rb") as f:
                data = f.read()
            if self._event_bytes_uploaded.get(name) != len(data):
                paths.write_bytes(paths.join(self.tb_dir, name), data)
                self._event_bytes_uploaded[name] = len(data)


def _truncate_event_files(tb_dir: str, step: int) -> None:
    """Rewrite each TensorBoard event file without the events past ``step``.

    TensorBoard would otherwise show two values for each step a killed run
    trained past its last checkpoint (the resumed run trains them again).
    A record cut short by a kill ends the file's readable part.
    """
    files = sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*")))
    if not files:
        return
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    for path in files:
        kept, dropped = [], 0
        try:
            for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
                event = event_pb2.Event.FromString(record)
                if event.HasField("summary") and event.step > step:
                    dropped += 1
                else:
                    kept.append(record)
        except tf.errors.DataLossError:  # the tail a kill cut short
            dropped += 1
        if dropped:
            tmp = f"{path}.tmp-{os.getpid()}"
            with tf.io.TFRecordWriter(tmp) as w:
                for record in kept:
                    w.write(record)
            os.replace(tmp, path)


def _truncate_remote_event_files(tb_dir: str, step: int) -> None:
    """:func:`_truncate_event_files` for a ``tensorboard/`` on an object store: each
    event file is fetched into a local directory, truncated there, and written back
    whole when it changed."""
    if not paths.isdir(tb_dir):
        return
    with tempfile.TemporaryDirectory() as local:
        names = [n for n in paths.listdir(tb_dir) if n.startswith("events.out.tfevents.")]
        before = {}
        for name in names:
            before[name] = paths.read_bytes(paths.join(tb_dir, name))
            with open(os.path.join(local, name), "wb") as f:
                f.write(before[name])
        _truncate_event_files(local, step)
        for name in names:
            with open(os.path.join(local, name), "rb") as f:
                after = f.read()
            if after != before[name]:
                paths.write_bytes(paths.join(tb_dir, name), after)


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v
