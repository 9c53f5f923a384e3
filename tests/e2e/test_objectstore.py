"""Workdirs, sweeps and data dirs on an object store, against a GCS emulator and moto's S3
server on 127.0.0.1 (one of each, shared by the tests of this module). A test that is the
same on both stores runs on each (the ``store`` fixture); ``s3://`` checkpoints go through
a local mirror (``experiments.checkpoint_staging``), and the tests of that are s3's own.

Everything here talks to 127.0.0.1 only, and is made sure of: the tests run in
a network namespace that has nothing but loopback (``unshare --net``). The
outer test re-runs this file inside one; the inner tests skip anywhere else.
Every client's credential discovery is off (see :func:`_client_settings`): tensorstore
gets a fake token, gcsfs is anonymous, the GCE metadata server is an unusable loopback
port, botocore gets fixed test keys and no config files or EC2 metadata.

Those settings are the inner process's own, from its start (the outer test gives them):
fsspec reads its ``FSSPEC_*`` variables and gcsfs its feature switch when they are
imported, long before a fixture runs. So runs that need neither a signal nor a fresh
process run in this process (``run_in_process``), as a fresh runner would see the
store; only the servers' endpoints are set by the fixtures, and every client reads
those when it connects.
"""

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import chex
import numpy as np
import pytest

from tests.helpers.paths import REPO
from tests.helpers.paths import SHARED_TFDS as TFDS_DIR
from tests.helpers.runs import DIGITS, Finished, exit_code, run_cli, run_in_process

pytestmark = pytest.mark.objectstore

IN_NAMESPACE = "GRASP_JAX_LOOPBACK_NAMESPACE"
BUCKET = "grasp-test"
NEEDS_CIFAR = "needs the CIFAR-10 copy in ../shared/tfds"


def _client_settings() -> dict:
    """The inner process's environment for every storage client: no credential lookup
    anywhere, and no endpoint but the ones the fixtures set."""
    return {
        IN_NAMESPACE: "1",
        "EPATH_USE_TF": "false",                      # epath through gcsfs, not TensorFlow
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",      # tensorstore: no credential lookup
        "FSSPEC_GS_TOKEN": "anon",                    # gcsfs: no credential lookup
        "FSSPEC_GS_PROJECT": "test",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no bucket-type lookup over gRPC
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:1",
        "GCE_METADATA_IP": "127.0.0.1:1",
        "GOOGLE_APPLICATION_CREDENTIALS": "",
        "AWS_ACCESS_KEY_ID": "testing",               # botocore: fixed keys, nothing looked up
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }


def _gcs_endpoint_env(port: int) -> dict:
    url = f"http://127.0.0.1:{port}"
    return {"STORAGE_EMULATOR_HOST": url,             # gcsfs, read on each request
            "TENSORSTORE_GCS_HTTP_URL": url}          # tensorstore, i.e. orbax's arrays


def _require_client_settings() -> None:
    """Fail, naming the cause, unless this process started with :func:`_client_settings`
    (a run in this process would otherwise look for real credentials)."""
    import fsspec.config

    missing = sorted(k for k, v in _client_settings().items() if os.environ.get(k) != v)
    token = fsspec.config.conf.get("gs", {}).get("token")
    assert not missing and token == "anon", (
        f"this process lacks the client settings {missing} (fsspec's gs token: {token!r}); "
        "start the suite through the outer test, which sets them before anything imports "
        "a storage client")


# --------------------------------------------------------------------------
# The outer test: the suite inside a loopback-only network namespace.


def _unshare_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    r = subprocess.run(["unshare", "--net", "--", "true"], capture_output=True)
    return r.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get(IN_NAMESPACE) == "1", reason="already inside")
def test_the_object_store_suite_in_a_loopback_only_network_namespace():
    if not _unshare_works():
        pytest.skip("unshare --net is unavailable here (needs root or user namespaces)")
    pytest.importorskip("gcp_storage_emulator")
    pytest.importorskip("gcsfs")
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    inner = (f"ip link set lo up && exec {sys.executable} -m pytest -q -x "
             f"-p no:cacheprovider {Path(__file__).resolve().relative_to(REPO)}")
    r = subprocess.run(["unshare", "--net", "--", "sh", "-c", inner], cwd=REPO,
                       env={**os.environ, **_client_settings()},
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    # Everything ran but this outer test itself and, where the CIFAR-10 copy is absent, the
    # test that needs it: none skipped for want of a server (pytest's -ra lists each skip).
    skipped = re.findall(r"^SKIPPED \[\d+\] \S+:\d+: (.*)$", r.stdout, re.MULTILINE)
    allowed = {"already inside"} | (set() if TFDS_DIR.is_dir() else {NEEDS_CIFAR})
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-3000:]
    assert skipped.count("already inside") == 1 and set(skipped) <= allowed, r.stdout[-3000:]


# --------------------------------------------------------------------------
# The servers, and the store fixture that runs a test on each.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environment_restored_afterwards():
    """The whole environment as it was, whatever the body sets (module-scoped fixtures
    cannot use ``monkeypatch``)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def gcs():
    """A GCS emulator on 127.0.0.1 with one bucket; the clients' env pointed at it."""
    if os.environ.get(IN_NAMESPACE) != "1":
        pytest.skip("runs inside the loopback-only namespace that the outer test starts")
    port = _free_port()
    emulator = Path(__file__).resolve().parents[1] / "helpers" / "gcs_emulator.py"
    _require_client_settings()
    server = subprocess.Popen([sys.executable, str(emulator),
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert server.stdout.readline().strip() == b"ready"
        with _environment_restored_afterwards():
            os.environ.update(_gcs_endpoint_env(port))
            import gcsfs

            fs = gcsfs.GCSFileSystem(token="anon", project="test", skip_instance_cache=True)
            fs.mkdir(BUCKET)
            yield fs
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with one bucket; botocore pointed at it (its test keys
    are the process's), and the checkpoint mirrors in a folder of their own (to see that
    they are removed)."""
    if os.environ.get(IN_NAMESPACE) != "1":
        pytest.skip("runs inside the loopback-only namespace that the outer test starts")
    server_module = pytest.importorskip("moto.server")
    from experiments import checkpoint_staging

    _require_client_settings()
    port = _free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        with _environment_restored_afterwards():
            # botocore reads the endpoint when a client is made, after this.
            os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                               checkpoint_staging.CACHE_ENV: str(
                                   tmp_path_factory.mktemp("mirrors"))})
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir(BUCKET)
            yield fs
    finally:
        server.stop()


def _no_gs_credentials(monkeypatch, tmp_path):
    # No anonymous access asked for, no key file, an empty gcloud config, no metadata server.
    monkeypatch.delenv("FSSPEC_GS_TOKEN")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))


def _no_s3_credentials(monkeypatch, tmp_path):
    # No keys in the environment; config files and EC2 metadata are off already.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")


@dataclasses.dataclass
class Store:
    """One of the two stores, as a test sees it."""

    scheme: str  # "gs" or "s3"
    fs: Any  # the fsspec file system the test looks at the bucket with
    endpoint_env: str  # the variable that points the runner's clients at the server
    drop_credentials: Callable[[Any, Path], None]  # (monkeypatch, tmp_path): none are found

    def url(self, key: str = "") -> str:
        return f"{self.scheme}://{BUCKET}/{key}".rstrip("/")


@pytest.fixture(params=["gs", "s3"])
def store(request):
    if request.param == "gs":
        return Store("gs", request.getfixturevalue("gcs"), "STORAGE_EMULATOR_HOST",
                     _no_gs_credentials)
    return Store("s3", request.getfixturevalue("s3"), "AWS_ENDPOINT_URL", _no_s3_credentials)


def _names(fs, url):
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url, detail=False, refresh=True))


def _mirrors_left() -> list[str]:
    """The checkpoint mirrors on local disk (the s3 fixture gives them a folder)."""
    from experiments import checkpoint_staging

    root = checkpoint_staging.cache_root()
    return os.listdir(root) if os.path.isdir(root) else []


# --------------------------------------------------------------------------
# Runs, locks and refusals, the same on both stores.


def test_a_digits_run_on_a_bucket_writes_every_output_and_nothing_local(store):
    url = store.url("run1")
    args = DIGITS + ["--method", "grasp", "--sparsity", "0.9", "--max_steps", "12",
                     "--checkpoint_every_steps", "6", "--log_every_steps", "4", "--workdir", url]
    r = run_in_process(args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = _names(store.fs, url)
    assert {"config.json", "checkpoints", "metrics.jsonl", "tensorboard", "sparsity.md",
            "density.png", "masks.npz", "gradient_flow.json", "sparse_params.npz",
            "results.json"} <= set(names), names
    assert "run.lock" not in names and not any(".tmp-" in n for n in names)
    assert not (REPO / f"{store.scheme}:").exists()  # a URL is never turned into a local folder
    results = json.loads(store.fs.cat(f"{url}/results.json"))
    assert results["status"] == "done" and results["steps"] == 12
    steps = [json.loads(line)["step"] for line in store.fs.cat(f"{url}/metrics.jsonl").splitlines()]
    assert steps == sorted(steps) and steps[-1] == 12  # the train and eval records of 12
    assert _names(store.fs, f"{url}/checkpoints") == ["12", "6"]
    assert any(n.startswith("events.out.tfevents.") for n in _names(store.fs, f"{url}/tensorboard"))
    if store.scheme == "s3":  # every step uploaded whole, its marker last; no mirror left
        from experiments import checkpoint_staging

        for step in (6, 12):
            manifest = json.loads(store.fs.cat(
                f"{url}/checkpoints/{step}/{checkpoint_staging.MARKER}"))
            uploaded = {k.split(f"/checkpoints/{step}/", 1)[1]: v["size"] for k, v in
                        store.fs.find(f"{url}/checkpoints/{step}", detail=True).items()}
            uploaded.pop(checkpoint_staging.MARKER)
            assert uploaded == manifest["files"]
        assert _mirrors_left() == []

    # The same command again: the run is finished, so it resumes at 12 and trains nothing.
    again = run_in_process(args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming from step 12" in again.stdout

    # --overwrite removes the run's objects and starts over.
    fresh = run_in_process(DIGITS + ["--method", "grasp", "--sparsity", "0.9", "--max_steps", "6",
                                     "--checkpoint_every_steps", "6", "--workdir", url,
                                     "--overwrite"])
    assert fresh.returncode == 0, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    assert _names(store.fs, f"{url}/checkpoints") == ["6"]


def test_a_locked_workdir_on_a_bucket_is_refused_naming_the_holder(store):
    # A second run on a workdir that a live run (on another host) holds.
    url = store.url("locked")
    holder = {"pid": 4242, "host": "tpu-host-7", "started": "2026-01-01 00:00:00 UTC"}
    store.fs.pipe(f"{url}/run.lock", json.dumps(holder).encode())
    r = run_in_process(DIGITS + ["--max_steps", "2", "--workdir", url])
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "process 4242 on tpu-host-7" in r.stderr and f"remove {url}/run.lock" in r.stderr
    assert _names(store.fs, url) == ["run.lock"]  # nothing else was written


def test_a_stale_lock_on_a_bucket_from_this_host_is_taken_over(store):
    from experiments import workdir as workdirs

    url = store.url("stale")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store.fs.pipe(f"{url}/run.lock", json.dumps(
        {"pid": gone.pid, "host": socket.gethostname(), "started": "earlier"}).encode())
    lock = workdirs.Lock(url)
    lock.acquire()
    assert lock.took_over and f"process {gone.pid}" in lock.took_over
    assert json.loads(store.fs.cat(f"{url}/run.lock"))["pid"] == os.getpid()
    lock.release()
    assert not store.fs.exists(f"{url}/run.lock")


def test_only_one_of_many_racing_lock_takers_wins(store):
    from experiments import paths

    url = store.url("race/run.lock")
    wins, barrier = [], threading.Barrier(8)

    def take(i):
        barrier.wait()
        if paths.create_exclusive(url, str(i).encode()):
            wins.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.fs.cat(url) == str(wins[0]).encode()  # the winner's content, never overwritten


def test_the_write_probe_leaves_nothing_behind(store):
    from experiments import paths

    assert paths.unusable_url(store.url("probed")) is None
    store.fs.invalidate_cache()
    assert not any(".write-probe" in k for k in store.fs.find(BUCKET))


def test_a_missing_bucket_is_refused_in_one_line_before_anything_is_written(store):
    url = f"{store.scheme}://no-such-bucket-here/run"
    r = run_in_process(DIGITS + ["--max_steps", "2", "--workdir", url])
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    line = [x for x in r.stderr.splitlines() if url in x]
    assert line and "no such bucket 'no-such-bucket-here'" in line[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (REPO / f"{store.scheme}:").exists()
    assert "no-such-bucket-here" not in [b.rstrip("/") for b in store.fs.ls("", refresh=True)]


def test_an_unreachable_store_is_refused_in_one_line_within_seconds(store, monkeypatch):
    closed = _free_port()  # nothing listens there: the connection is refused at once
    monkeypatch.setenv(store.endpoint_env, f"http://127.0.0.1:{closed}")
    url = store.url("unreachable")
    start = time.monotonic()
    r = run_in_process(DIGITS + ["--max_steps", "2", "--workdir", url])
    took = time.monotonic() - start
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    line = [x for x in r.stderr.splitlines() if url in x]
    assert line and "no network connection to the store at http://127.0.0.1:" in line[0], \
        r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (REPO / f"{store.scheme}:").exists()
    assert took < 60, took  # the clients' own retries would take minutes
    monkeypatch.undo()  # the server again, for this process's client
    assert not store.fs.exists(url)


def test_a_store_without_credentials_is_refused_in_one_line(store, monkeypatch, tmp_path):
    # In a fresh process: fsspec takes gcsfs's anonymous token from the environment when it
    # is imported, so this process keeps it whatever the test removes.
    store.drop_credentials(monkeypatch, tmp_path)
    url = store.url("no-credentials")
    r = run_cli(DIGITS + ["--max_steps", "2", "--workdir", url])
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    line = [x for x in r.stderr.splitlines() if url in x]
    assert line and "no usable credentials" in line[0], r.stderr[-2000:]
    monkeypatch.undo()
    assert "Traceback" not in r.stderr and not store.fs.exists(url)


def test_an_s3_workdir_whose_checkpoint_mirror_cannot_be_written_is_refused(s3, tmp_path,
                                                                            monkeypatch):
    from experiments import checkpoint_staging

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(checkpoint_staging.CACHE_ENV, str(blocker / "mirrors"))
    url = f"s3://{BUCKET}/no-mirror"
    r = run_in_process(DIGITS + ["--max_steps", "2", "--workdir", url])
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    line = [x for x in r.stderr.splitlines() if url in x]
    assert line and "local checkpoint mirror" in line[0] and str(blocker) in line[0], r.stderr
    assert "Traceback" not in r.stderr and not s3.exists(url)


def _sweep_in_process(argv) -> Finished:
    """The sweep's command line in this process (its cells are processes of their own)."""
    from experiments.sweep import cli as sweep_cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = sweep_cli.main(list(argv))
        except SystemExit as e:
            code = exit_code(e)
    return Finished(code, out.getvalue(), err.getvalue())


def _sweep(sweep_dir, *extra) -> Finished:
    return _sweep_in_process(["--sweep_dir", sweep_dir, "--quiet", "--methods", "random",
                              "--sparsities", "0.5", "--seeds", "0,1", "--dataset", "digits",
                              "--arch", "mlp", "--batch_size", "32", "--max_steps", "2", *extra])


@pytest.mark.slow
def test_a_two_cell_sweep_on_a_bucket_writes_its_cells_logs_and_report_there(store):
    url, fs = store.url("sweep"), store.fs
    r = _sweep(url)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "cell 2/2: random s=0.5 seed=1: done" in r.stdout, r.stdout
    cells = ["random_s0.5_seed0", "random_s0.5_seed1"]
    names = _names(fs, url)
    assert set(cells) | {"results.md", "results.csv", "accuracy_vs_sparsity.png",
                         "layer_density.png"} <= set(names), names
    table = fs.cat(f"{url}/results.csv").decode().splitlines()
    assert table[1].startswith("digits,mlp,random,0.5,none,float32,2,0 1,2,"), table
    for cell in cells:
        log = fs.cat(f"{url}/{cell}/log.txt").decode()
        assert log.startswith("=== ") and log.rstrip().endswith("=== exit status 0"), log[-500:]
        assert json.loads(fs.cat(f"{url}/{cell}/results.json"))["status"] == "done"
        assert _names(fs, f"{url}/{cell}/checkpoints") == ["2"]
    assert not (REPO / f"{store.scheme}:").exists()

    # Rerun: every cell is finished and skipped; the logs stay as they were.
    logs = {c: fs.cat(f"{url}/{c}/log.txt") for c in cells}
    again = _sweep(url)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 finished, 0 to run" in again.stdout
    assert {c: fs.cat(f"{url}/{c}/log.txt") for c in cells} == logs

    # A cell's results gone: it runs again, its new output appended below the old log.
    fs.rm(f"{url}/{cells[1]}/results.json")
    third = _sweep(url)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "1 finished, 1 to run" in third.stdout
    log = fs.cat(f"{url}/{cells[1]}/log.txt")
    assert log.startswith(logs[cells[1]]) and log.count(b"=== exit status 0") == 2

    report = _sweep_in_process(["--sweep_dir", url, "--report_only"])
    assert report.returncode == 0, report.stderr[-2000:]
    assert f"report of 1 rows in {url}/results.md" in report.stdout


def test_a_sweep_dir_in_a_missing_bucket_is_refused_in_one_line(store):
    url = f"{store.scheme}://no-such-sweep-bucket/sweep"
    r = _sweep(url)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    line = [x for x in r.stderr.splitlines() if url in x]
    assert line and "no such bucket 'no-such-sweep-bucket'" in line[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (REPO / f"{store.scheme}:").exists()


@pytest.mark.slow
@pytest.mark.skipif(not TFDS_DIR.is_dir(), reason=NEEDS_CIFAR)
def test_a_cifar10_run_reads_its_tfds_data_dir_from_the_bucket(gcs, tmp_path, monkeypatch):
    data_url, version = f"gs://{BUCKET}/tfds", "cifar10/3.0.2"
    gcs.put(str(TFDS_DIR / "cifar10"), f"{data_url}/cifar10", recursive=True)
    cache = tmp_path / "cache"
    monkeypatch.setenv("GRASP_JAX_DATA_CACHE", str(cache))
    args = ["--dataset", "cifar10", "--arch", "small_vgg", "--method", "random",
            "--sparsity", "0.5", "--batch_size", "32", "--max_steps", "2",
            "--data_dir", data_url]
    url = f"gs://{BUCKET}/cifar-run"
    r = run_in_process(args + ["--workdir", url])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads(gcs.cat(f"{url}/results.json"))["status"] == "done"
    copy = cache / "gs" / BUCKET / "tfds" / version
    for original in (TFDS_DIR / version).iterdir():  # the local copy is the bucket's bytes
        assert (copy / original.name).read_bytes() == original.read_bytes(), original.name

    # A shard cut short in the bucket: the copy follows it, and the size check names the file
    # before the run writes anything. In a fresh process: a process brings its copy up to
    # date once, at its first run.
    shard = "cifar10-test.tfrecord-00000-of-00001"
    gcs.pipe(f"{data_url}/{version}/{shard}", (TFDS_DIR / version / shard).read_bytes()[:-100])
    r = run_cli(args + ["--workdir", f"gs://{BUCKET}/cifar-damaged"])
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert shard in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not gcs.exists(f"gs://{BUCKET}/cifar-damaged")


# --------------------------------------------------------------------------
# Checkpoints: a stop and a resume, damage, unfinished uploads.


STOPPED_RUN = DIGITS + ["--method", "random", "--sparsity", "0.5", "--max_steps", "20",
                        "--checkpoint_every_steps", "10", "--log_every_steps", "3"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """The workdir of STOPPED_RUN done without a stop, on local disk: the reference that
    the stopped run on each store must match."""
    straight = tmp_path_factory.mktemp("straight")
    r = run_in_process(STOPPED_RUN + ["--workdir", str(straight)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return straight


@pytest.mark.slow
def test_sigterm_on_a_bucket_saves_and_the_resumed_run_is_bit_exact(store, straight_run):
    from experiments import checkpointing

    args, straight, broken = STOPPED_RUN, straight_run, store.url("broken")
    r = run_cli(args + ["--workdir", broken], signal_at=(14, signal.SIGTERM))
    assert r.returncode == 128 + signal.SIGTERM, r.stdout[-2000:] + r.stderr[-3000:]
    assert checkpointing.load_state(broken)[0] == 14
    assert not store.fs.exists(f"{broken}/results.json")
    r = run_in_process(args + ["--workdir", broken])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "resuming from step 14" in r.stdout
    (s1, a), (s2, b) = (checkpointing.load_state(str(d)) for d in (straight, broken))
    assert s1 == s2 == 20
    chex.assert_trees_all_equal(a, b)
    local = [json.loads(x)["step"] for x in (straight / "metrics.jsonl").read_text().splitlines()]
    remote = [json.loads(x)["step"] for x in store.fs.cat(f"{broken}/metrics.jsonl").splitlines()]
    # In order, nothing after the checkpoint at 14 twice (a train and an eval record may share
    # a step, as on local disk).
    assert remote == sorted(remote) and set(local) <= set(remote)
    assert remote.count(20) == local.count(20)


def _save_three(url):
    from experiments import checkpointing

    ckpt = checkpointing.Checkpointer(url, max_to_keep=3)
    rng = np.random.default_rng(0)
    states = {}
    for step in (10, 20, 30):
        states[step] = {"w": rng.normal(size=(64, 64)).astype(np.float32),
                        "step": np.asarray(step, np.int32)}
        ckpt.save(step, states[step], {"best_step": step})
    ckpt.close()
    return states


ABSTRACT = {"w": np.zeros((64, 64), np.float32), "step": np.asarray(0, np.int32)}


def test_a_damaged_newest_checkpoint_on_a_bucket_is_moved_aside(store):
    from experiments import checkpointing

    url = store.url("damaged")
    states = _save_three(url)
    store.fs.rm(f"{url}/checkpoints/30/state/_METADATA")
    lines = []
    ckpt = checkpointing.Checkpointer(url, max_to_keep=3)
    step, state, meta = ckpt.restore_newest(ABSTRACT, log=lines.append)
    ckpt.close()
    assert step == 20 and meta == {"best_step": 20}
    np.testing.assert_array_equal(state["w"], states[20]["w"])
    assert len(lines) == 1 and "checkpoint 30 cannot be restored" in lines[0]
    assert store.fs.exists(f"{url}/{checkpointing.DAMAGED_DIR}/30/commit_success.txt")
    assert _names(store.fs, f"{url}/checkpoints") == ["10", "20"]


def test_flipped_bytes_in_an_s3_checkpoint_are_found_by_the_digest(s3):
    # A file of the right size with other bytes passes the upload's manifest; the digest
    # of the restored arrays finds it.
    from experiments import checkpointing

    url = f"s3://{BUCKET}/flipped"
    states = _save_three(url)
    sizes = {k: v["size"] for k, v in s3.find(f"{url}/checkpoints/30/state", detail=True).items()}
    largest = max(sizes, key=sizes.get)  # the array data
    blob = bytearray(s3.cat(largest))
    blob[len(blob) // 2] ^= 0x10  # inside the array bytes, not the file's structure
    s3.pipe(largest, bytes(blob))
    lines = []
    ckpt = checkpointing.Checkpointer(url, max_to_keep=3)
    step, state, _ = ckpt.restore_newest(ABSTRACT, log=lines.append)
    ckpt.close()
    assert step == 20 and len(lines) == 1, lines
    assert "checkpoint 30 cannot be restored (DigestMismatch" in lines[0]
    np.testing.assert_array_equal(state["w"], states[20]["w"])
    assert s3.exists(f"{url}/{checkpointing.DAMAGED_DIR}/30")


def test_an_s3_step_whose_upload_marker_is_missing_is_not_restored_and_is_removed(s3):
    from experiments import checkpoint_staging, checkpointing, paths
    from experiments import workdir as workdirs

    url = f"s3://{BUCKET}/unfinished"
    states = _save_three(url)
    s3.rm(f"{url}/checkpoints/30/{checkpoint_staging.MARKER}")  # killed before the marker
    assert checkpointing.load_state(url)[0] == 20  # never read, even for analysis
    lines = []
    ckpt = checkpointing.Checkpointer(url, max_to_keep=3)  # process 0 removes it on opening
    assert _names(s3, f"{url}/checkpoints") == ["10", "20"]
    assert ckpt.all_steps() == [10, 20] and ckpt.latest_step() == 20
    step, state, _ = ckpt.restore_newest(ABSTRACT, log=lines.append)
    assert step == 20 and lines == []  # not a damaged step: nothing moved aside
    np.testing.assert_array_equal(state["w"], states[20]["w"])

    # Saving again after the restore: the bucket keeps the newest three.
    ckpt.save(40, {**states[20], "step": np.asarray(40, np.int32)}, {"best_step": 40})
    ckpt.close()
    assert _names(s3, f"{url}/checkpoints") == ["10", "20", "40"]
    assert not s3.exists(f"{url}/{checkpointing.DAMAGED_DIR}")
    assert _mirrors_left() == []

    # A workdir whose committed steps were all moved aside is refused even if an unfinished
    # one is left: that one does not count.
    for step in (10, 20, 40):
        paths.move(f"{url}/checkpoints/{step}", f"{url}/{checkpointing.DAMAGED_DIR}/{step}")
    s3.pipe(f"{url}/checkpoints/50/state/_METADATA", b"{}")
    assert "no checkpoint in" in workdirs.no_usable_checkpoint(url)


def test_metrics_on_a_bucket_keep_one_record_per_step_after_a_resume(store, tmp_path):
    from experiments.metrics import MetricWriter

    url = store.url("metrics")
    writer = MetricWriter(url)
    for step in range(1, 11):
        writer.write(step, {"train/loss": float(step)})
    writer.close()  # a run killed after step 10, its last checkpoint at 6
    writer = MetricWriter(url)
    writer.truncate_after(6)
    for step in range(7, 13):
        writer.write(step, {"train/loss": float(step)})
    writer.close()
    steps = [json.loads(x)["step"] for x in store.fs.cat(f"{url}/metrics.jsonl").splitlines()]
    assert steps == list(range(1, 13))
    store.fs.get(f"{url}/tensorboard/", str(tmp_path / "tb"), recursive=True)
    assert _tb_steps_in(tmp_path) == list(range(1, 13))


def _tb_steps_in(directory: Path) -> list[int]:
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    steps = []
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            event = event_pb2.Event.FromString(record)
            if event.HasField("summary"):
                steps.append(event.step)
    return sorted(steps)


@pytest.mark.slow
def test_two_processes_checkpoint_to_s3_and_both_resume_from_it(s3, tmp_path):
    # Process 0 saves and uploads; each process restores from its own downloaded copy.
    from tests.e2e.test_multihost import _run_pair

    url = f"s3://{BUCKET}/pair"
    args = DIGITS + ["--method", "random", "--sparsity", "0.5", "--log_every_steps", "1",
                     "--no-gradient_flow", "--checkpoint_every_steps", "2", "--workdir", url]
    codes, logs = _run_pair(args + ["--max_steps", "4"], tmp_path, "first")
    assert codes == [0, 0], "\n\n".join(logs)
    assert _names(s3, f"{url}/checkpoints") == ["2", "4"]
    # The second pass: a process that started over instead of resuming would run other
    # steps than its peer, and the collectives would not finish.
    codes, logs = _run_pair(args + ["--max_steps", "6"], tmp_path, "second")
    assert codes == [0, 0], "\n\n".join(logs)
    assert "resuming from step 4" in logs[0] and "masks agree across 2 processes" in logs[0]
    results = json.loads(s3.cat(f"{url}/results.json"))
    assert results["steps"] == 6 and results["processes"] == 2
    assert _names(s3, f"{url}/checkpoints") == ["2", "4", "6"]
    assert _mirrors_left() == []


# --------------------------------------------------------------------------
# Data dirs and the namespace.


def test_an_s3_data_dir_is_copied_to_the_local_cache(s3, tmp_path, monkeypatch):
    # Streamed or read whole: TensorFlow 2.21 has no s3:// file system, so TFDS always
    # reads a local copy.
    from grasp_jax.data import staging

    monkeypatch.setenv(staging.CACHE_ENV, str(tmp_path))
    s3.pipe({f"{BUCKET}/tfds/toy/1.0.0/dataset_info.json": b"{}",
             f"{BUCKET}/tfds/toy/1.0.0/toy-train.tfrecord-00000-of-00001": b"r" * 1000})
    local = staging.local_data_dir(f"s3://{BUCKET}/tfds", "toy", read_whole=False)
    copy = tmp_path / "s3" / BUCKET / "tfds"
    assert local == str(copy)
    assert (copy / "toy/1.0.0/toy-train.tfrecord-00000-of-00001").read_bytes() == b"r" * 1000


def test_the_namespace_has_loopback_only():
    """The guarantee these tests rest on: inside the namespace the only network
    interface is loopback, so nothing but 127.0.0.1 can be reached."""
    if os.environ.get(IN_NAMESPACE) != "1":
        pytest.skip("checks the namespace from inside it")
    assert [name for _, name in socket.if_nameindex()] == ["lo"]
