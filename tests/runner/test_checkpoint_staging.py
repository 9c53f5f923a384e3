"""The bucket side of staged (``s3://``) checkpoints, on local folders.

The path layer treats a local path and a bucket URL alike, so the upload, the commit
marker, the download checks and the retention are tested here on local disk; the same
code against an S3 server, with orbax and the runner, is in
``tests/e2e/test_objectstore.py``.
"""

import json
import os

import pytest

from experiments import checkpoint_staging as staging
from experiments import paths


def _local_step(root, step, files=None):
    """A finished step in a mirror, as orbax leaves it (a few nested files)."""
    files = files or {"_CHECKPOINT_METADATA": b"{}", "state/_METADATA": b"m" * 40,
                      "state/ocdbt.process_0/d/abc": bytes(range(200))}
    step_dir = root / "mirror" / str(step)
    for relative, data in files.items():
        (step_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (step_dir / relative).write_bytes(data)
    return step_dir


def test_an_uploaded_step_is_committed_and_comes_back_byte_for_byte(tmp_path):
    bucket = str(tmp_path / "bucket" / "checkpoints")
    step_dir = _local_step(tmp_path, 10)
    manifest = staging.upload_step(str(step_dir), bucket, 10)
    assert manifest["files"]["state/ocdbt.process_0/d/abc"] == 200
    assert staging.committed_steps(bucket) == [10]
    marker = json.loads((tmp_path / "bucket/checkpoints/10" / staging.MARKER).read_text())
    assert marker == manifest
    back = tmp_path / "back" / "10"
    staging.download_step(bucket, 10, str(back))
    for relative in manifest["files"]:
        assert (back / relative).read_bytes() == (step_dir / relative).read_bytes()
    assert not (back / staging.MARKER).exists()  # the marker is the bucket's, not the step's


def test_the_marker_is_written_last(tmp_path, monkeypatch):
    bucket = str(tmp_path / "bucket")
    step_dir = _local_step(tmp_path, 7)
    written = []
    upload, write_text = paths.upload_file, paths.write_text
    monkeypatch.setattr(paths, "upload_file", lambda src, dst: (written.append(dst),
                                                                upload(src, dst)))
    monkeypatch.setattr(paths, "write_text", lambda dst, text: (written.append(dst),
                                                                write_text(dst, text)))
    staging.upload_step(str(step_dir), bucket, 7)
    assert len(written) == 4 and written[-1].endswith(f"7/{staging.MARKER}")


def test_an_upload_cut_short_is_not_committed_and_is_removed(tmp_path, monkeypatch):
    bucket = str(tmp_path / "bucket")
    staging.upload_step(str(_local_step(tmp_path, 5)), bucket, 5)
    calls = []
    upload = paths.upload_file

    def killed_after_two(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process stops mid-upload
        upload(src, dst)

    monkeypatch.setattr(paths, "upload_file", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        staging.upload_step(str(_local_step(tmp_path, 10)), bucket, 10)
    monkeypatch.undo()
    assert staging.step_dirs(bucket) == [5, 10]
    assert staging.committed_steps(bucket) == [5]
    with pytest.raises(staging.IncompleteStep, match="did not finish"):
        staging.download_step(bucket, 10, str(tmp_path / "back"))
    assert staging.remove_unfinished(bucket) == [10]
    assert staging.step_dirs(bucket) == [5]


def test_a_download_refuses_a_missing_or_resized_file(tmp_path):
    bucket = tmp_path / "bucket"
    staging.upload_step(str(_local_step(tmp_path, 3)), str(bucket), 3)
    (bucket / "3" / "state" / "_METADATA").write_bytes(b"m" * 39)
    with pytest.raises(staging.IncompleteStep, match="has 39 bytes, its manifest 40"):
        staging.download_step(str(bucket), 3, str(tmp_path / "back"))
    os.remove(bucket / "3" / "state" / "_METADATA")
    with pytest.raises(staging.IncompleteStep, match="_METADATA is missing"):
        staging.download_step(str(bucket), 3, str(tmp_path / "back"))


@pytest.mark.parametrize("files, needle", [
    ({"../../outside": 3}, "outside its step"),
    ({"/etc/passwd": 3}, "outside its step"),
    ({}, "not a manifest"),
    ({"a": "3"}, "not a manifest"),
])
def test_a_manifest_naming_files_outside_its_step_is_refused(tmp_path, files, needle):
    step = tmp_path / "bucket" / "4"
    step.mkdir(parents=True)
    (step / staging.MARKER).write_text(json.dumps({"step": 4, "files": files}))
    with pytest.raises(staging.IncompleteStep, match=needle):
        staging.download_step(str(tmp_path / "bucket"), 4, str(tmp_path / "back" / "4"))
    assert not (tmp_path / "outside").exists()


def test_retention_keeps_the_newest_committed_steps_and_deletes_marker_first(tmp_path,
                                                                            monkeypatch):
    bucket = str(tmp_path / "bucket")
    for step in (1, 2, 3, 4):
        staging.upload_step(str(_local_step(tmp_path, step)), bucket, step)
    removed = []
    remove, remove_tree = paths.remove, paths.remove_tree
    monkeypatch.setattr(paths, "remove", lambda p: (removed.append(p), remove(p)))
    monkeypatch.setattr(paths, "remove_tree", lambda p: (removed.append(p), remove_tree(p)))
    assert staging.keep_newest(bucket, 2) == [1, 2]
    assert staging.step_dirs(bucket) == [3, 4]
    assert removed[0].endswith(f"1/{staging.MARKER}") and removed[1].endswith("/1")


def test_each_process_has_its_own_mirror_under_the_configured_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(staging.CACHE_ENV, str(tmp_path / "cache"))
    url = "s3://bucket/run/checkpoints"
    mirrors = {staging.mirror_dir(url, i) for i in range(2)}
    assert len(mirrors) == 2
    assert all(m.startswith(str(tmp_path / "cache") + os.sep) for m in mirrors)
    assert staging.mirror_dir(url + "/", 0) == staging.mirror_dir(url, 0)
    assert staging.mirror_dir("s3://bucket/other/checkpoints", 0) not in mirrors
    assert staging.is_staged(url) and not staging.is_staged("gs://bucket/run")


def test_a_background_upload_hands_its_error_to_the_next_wait():
    upload = staging.BackgroundUpload()
    done = []
    upload.start(lambda: done.append(1))
    upload.wait()
    assert done == [1]

    def fails():
        raise OSError("bucket gone")

    upload.start(fails)
    with pytest.raises(OSError, match="bucket gone"):
        upload.wait()
    upload.wait()  # raised once only
