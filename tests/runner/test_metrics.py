"""Tests of experiments.metrics' writer on an object store: how often metrics.jsonl is
rewritten (a bucket cannot append, so each rewrite uploads the whole file)."""

from __future__ import annotations

import json

from experiments import metrics


def test_a_remote_metrics_file_is_rewritten_at_most_once_a_minute_and_at_each_flush(
        tmp_path, monkeypatch):
    uploads: list[list[int]] = []  # the steps in each upload of metrics.jsonl
    monkeypatch.setattr(metrics, "write_text", lambda path, text: uploads.append(
        [json.loads(line)["step"] for line in text.splitlines()]))
    clock = [1000.0]
    monkeypatch.setattr(metrics, "_now", lambda: clock[0])
    writer = metrics.MetricWriter(str(tmp_path))
    writer.remote = True  # as for a gs:// or s3:// workdir; the upload is recorded above

    for step in range(1, 101):  # 100 records over 10 s
        writer.write(step, {"train/loss": 1.0})
        clock[0] += 0.1
    assert uploads == [[1]]  # the first at once, so that the run shows up
    clock[0] += metrics.REMOTE_RECORDS_EVERY_S
    writer.write(101, {"train/loss": 1.0})
    assert uploads[-1] == list(range(1, 102)) and len(uploads) == 2
    writer.write(102, {"train/loss": 1.0})
    assert len(uploads) == 2
    writer.flush()  # an evaluation or a checkpoint: every record so far goes up
    assert uploads[-1] == list(range(1, 103)) and len(uploads) == 3
    writer.flush()
    writer.close()  # nothing new since: no upload
    assert len(uploads) == 3


def test_a_local_metrics_file_gets_every_record_as_it_is_written(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path))
    for step in (1, 2, 3):
        writer.write(step, {"train/loss": float(step)})
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(1, step + 1))
    writer.close()
