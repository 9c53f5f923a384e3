"""What an ``s3://`` workdir's checkpoints cost against a local one: save, upload, restore.

    python -m benchmarks.checkpoint_staging [--repeats 3]

Against moto's S3 server on 127.0.0.1, in a network namespace with loopback only
(the script re-runs itself inside ``unshare --net``, as the object-store tests do, and
refuses to run where that is unavailable). States shaped like a run's (parameters,
momentum, boolean masks) at the sizes of ResNet-32 and VGG19 on CIFAR-10. Per size and
store, the best of ``--repeats``:

* ``blocking``: how long ``Checkpointer.save`` holds the training loop (orbax hashes
  and hands the arrays to its writer; the write, and on s3 the upload, go on behind);
* ``saved``: until ``wait()`` returns: the step written (and on s3 uploaded, marker
  last);
* ``restore``: a fresh Checkpointer's ``restore_newest`` (on s3 with the download).

Then the s3/local ratio of each, from this one run. moto keeps objects in memory and
answers from one Python process, so the upload and download figures are those of this
loopback server, not of a real S3 endpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.checkpoint_states import run_like_state

IN_NAMESPACE = "GRASP_JAX_LOOPBACK_NAMESPACE"
BUCKET = "bench"
# Parameter counts of the networks (CIFAR-10).
SIZES = {"resnet32": 464_154, "vgg19": 20_035_018}


def measure(workdir: str, state: dict, repeats: int) -> tuple[float, float, float]:
    """(blocking, saved, restore) seconds, each the best of ``repeats``."""
    from experiments import checkpointing, paths

    blocking, saved, restored = [], [], []
    for r in range(repeats):
        paths.remove_tree(paths.join(workdir, "checkpoints"))
        ckpt = checkpointing.Checkpointer(workdir, max_to_keep=1)
        start = time.perf_counter()
        ckpt.save(1, state, {"r": r})
        blocking.append(time.perf_counter() - start)
        ckpt.wait()
        saved.append(time.perf_counter() - start)
        ckpt.close()
        ckpt = checkpointing.Checkpointer(workdir, max_to_keep=1)
        start = time.perf_counter()
        step, _, _ = ckpt.restore_newest(state, log=lambda _: None)
        restored.append(time.perf_counter() - start)
        ckpt.close()
        assert step == 1
    return min(blocking), min(saved), min(restored)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_namespace(argv: list[str]) -> int:
    """Re-run this script in a loopback-only network namespace; its exit status."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        print("needs `unshare --net` and `ip` (a network namespace with loopback only)",
              file=sys.stderr)
        return 2
    inner = " ".join([f"ip link set lo up && {IN_NAMESPACE}=1", sys.executable, "-m",
                      "benchmarks.checkpoint_staging", *argv])
    return subprocess.run(["unshare", "--net", "--", "sh", "-c", inner]).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if os.environ.get(IN_NAMESPACE) != "1":
        return _in_namespace(argv)
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "AWS_CONFIG_FILE": "/nonexistent",
                       "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"})
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
    rng = np.random.default_rng(0)
    print(f"{'state':<10}{'MB':>6}  {'store':<6}{'blocking s':>11}{'saved s':>9}"
          f"{'restore s':>11}")
    try:
        for name, n in SIZES.items():
            state = run_like_state(n, rng)
            mb = sum(x.nbytes for x in __import__("jax").tree_util.tree_leaves(state)) / 2**20
            with tempfile.TemporaryDirectory() as local:
                figures = {"local": measure(local, state, args.repeats),
                           "s3": measure(f"s3://{BUCKET}/{name}", state, args.repeats)}
            for store, (b, s, r) in figures.items():
                print(f"{name:<10}{mb:>6.0f}  {store:<6}{b:>11.3f}{s:>9.2f}{r:>11.2f}")
            ratio = [x / y for x, y in zip(figures["s3"], figures["local"])]
            print(f"{'':<18}s3/local{ratio[0]:>9.2f}x{ratio[1]:>8.2f}x{ratio[2]:>10.2f}x",
                  flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
