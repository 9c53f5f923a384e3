"""Tests of experiments.metrics' writer on an object store: how often metrics.jsonl is
rewritten (a bucket cannot append, so each rewrite uploads the whole file)."""

from __future__ import annotations

import json

from experiments import metrics, paths


def test_a_remote_metrics_file_is_rewritten_at_most_once_a_minute_and_at_each_flush(
        monkeypatch):
    uploads: list[list[int]] = []  # the steps in each upload of metrics.jsonl
    event_uploads: list[tuple[str, int]] = []  # (object, bytes) of each event file upload
    monkeypatch.setattr(metrics, "write_text", lambda path, text: uploads.append(
        [json.loads(line)["step"] for line in text.splitlines()]))
    monkeypatch.setattr(paths, "write_bytes",
                        lambda path, data: event_uploads.append((path, len(data))))
    monkeypatch.setattr(paths, "exists", lambda path: False)  # a fresh run: nothing there yet
    clock = [1000.0]
    monkeypatch.setattr(metrics, "_now", lambda: clock[0])
    writer = metrics.MetricWriter("gs://bucket/run")  # every storage call is recorded above

    for step in range(1, 101):  # 100 records over 10 s
        writer.write(step, {"train/loss": 1.0})
        clock[0] += 0.1
    assert uploads == [[1]] and event_uploads == []  # the first at once: the run shows up
    clock[0] += metrics.REMOTE_RECORDS_EVERY_S
    writer.write(101, {"train/loss": 1.0})
    assert uploads[-1] == list(range(1, 102)) and len(uploads) == 2
    writer.write(102, {"train/loss": 1.0})
    assert len(uploads) == 2
    writer.flush()  # an evaluation: every record and event so far goes up
    assert uploads[-1] == list(range(1, 103)) and len(uploads) == 3
    assert len(event_uploads) == 1
    assert event_uploads[0][0].startswith("gs://bucket/run/tensorboard/events.out.tfevents.")
    writer.flush()  # a checkpoint at the same step: nothing new, nothing uploaded
    assert len(uploads) == 3 and len(event_uploads) == 1
    writer.write(103, {"train/loss": 1.0})
    writer.close()
    assert uploads[-1] == list(range(1, 104)) and len(uploads) == 4
    assert len(event_uploads) == 2 and event_uploads[1][1] > event_uploads[0][1]


def test_a_local_metrics_file_gets_every_record_as_it_is_written(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path))
    for step in (1, 2, 3):
        writer.write(step, {"train/loss": float(step)})
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(1, step + 1))
    writer.close()
