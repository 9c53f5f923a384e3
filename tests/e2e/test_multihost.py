"""Multi-process runs on this machine: two real processes joined by JAX's distributed runtime.

Each process has 2 CPU devices (``--num_cpu_devices``) and the collectives go
through gloo over 127.0.0.1, exactly as two hosts of a cluster would. Runs use
scikit-learn's digits with LeNet-5 (GraSP at 90%) so that each test stays
within a couple of minutes on a loaded 2-core machine. Every process started
here is killed in a ``finally``, whatever happens. The comparison with one
process runs the real CIFAR-10 copy in ``../shared/tfds`` with the small VGG.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import checkpointing, distributed
from tests.helpers.paths import REPO, SHARED_TFDS

ARGS = ["--dataset", "digits", "--arch", "lenet5", "--batch_size", "32", "--method", "grasp",
        "--sparsity", "0.9", "--log_every_steps", "1", "--no-gradient_flow"]
CIFAR_ARGS = ["--dataset", "cifar10", "--arch", "small_vgg", "--data_dir", str(SHARED_TFDS),
              *ARGS[4:]]


# One process with 4 devices fed the global batches the two processes read together:
# process 0's shard on devices 0-1, process 1's on devices 2-3 (the global device order
# of the pair). Each process reads its own slice of the data, so the stream of a plain
# single-process run differs; this isolates the distributed computation itself.
_SAME_DATA_AS_TWO_PROCESSES = """
import sys
import tensorflow as tf
from grasp_jax import data
one_process = data.train_dataset
def train_dataset(name, **kw):
    shards = [one_process(name, **kw, process_index=i, process_count=2, local_device_count=2)
              for i in range(2)]
    return tf.data.Dataset.zip(tuple(shards)).map(
        lambda *parts: {k: tf.concat([p[k] for p in parts], 0) for k in parts[0]})
data.train_dataset = train_dataset
from experiments.run import main
sys.exit(main(sys.argv[1:]))
"""


# Process 1 flips one kept weight of its masks, as a nondeterministic scorer might.
_PROCESS_1_FLIPS_A_BIT = """
import sys
import jax
import numpy as np
from experiments import methods
compute = methods.compute_masks
def compute_masks(*a, **k):
    masks = compute(*a, **k)
    if jax.process_index() == 1:
        leaves, treedef = jax.tree_util.tree_flatten(masks)
        first = np.array(leaves[0])
        first.flat[0] = not first.flat[0]
        masks = jax.tree_util.tree_unflatten(treedef, [first] + leaves[1:])
    return masks
methods.compute_masks = compute_masks
from experiments.run import main
sys.exit(main(sys.argv[1:]))
"""


# Process 1 alone gets SIGTERM right after step 5 (a preemption notice that reaches the
# hosts at different steps).
_PROCESS_1_SIGTERM_AT_5 = """
import os, signal, sys
import jax
import experiments.steps as t
make = t.make_train_step
def make_train_step(model, tx, *args, **kwargs):
    step = make(model, tx, *args, **kwargs)
    def wrapped(state, batch):
        state, metrics = step(state, batch)
        if jax.process_index() == 1 and int(jax.device_get(state.step.addressable_data(0))[0]) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return state, metrics
    return wrapped
t.make_train_step = make_train_step
from experiments.run import main
sys.exit(main(sys.argv[1:]))
"""


# Process 1 starts pruning 40 s after process 0 (a slower host, or one compiling slower on a
# loaded machine): longer than gloo's 30 s wait for the other processes at the first
# collective over a group of devices, which scoring is for all four devices.
_PROCESS_1_LATE_BY_40S = """
import sys, time
import jax
from experiments import methods
compute = methods.compute_masks
def compute_masks(*a, **k):
    if jax.process_index() == 1:
        time.sleep(40)
    return compute(*a, **k)
methods.compute_masks = compute_masks
from experiments.run import main
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _start(args, log_path, script=None):
    out = open(log_path, "w")
    cmd = ["-m", "experiments.run"] if script is None else ["-c", script]
    try:
        return subprocess.Popen([sys.executable, *cmd, *args], cwd=REPO,
                                env=_env(), stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def _pair_args(args, port, pid, timeout=60):
    return [*args, "--num_cpu_devices", "2", "--coordinator_address", f"127.0.0.1:{port}",
            "--num_processes", "2", "--process_id", str(pid), "--distributed_timeout", str(timeout)]


def _run_pair(args, tmp_path, tag, timeout=400, script=None):
    """Both processes to completion; (return codes, logs)."""
    port = _free_port()
    logs = [tmp_path / f"{tag}_p{i}.log" for i in range(2)]
    procs = [_start(_pair_args(args, port, i), logs[i], script) for i in range(2)]
    try:
        deadline = time.time() + timeout
        for p in procs:
            p.wait(timeout=max(1, deadline - time.time()))
    finally:
        _kill(procs)
    return [p.returncode for p in procs], [log.read_text() for log in logs]


def _losses(workdir):
    lines = [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl")]
    return [m["train/loss"] for m in lines if "train/loss" in m]


def _agreement(a, b):
    a, b = np.load(a), np.load(b)
    assert a.files == b.files
    same = sum(int(np.sum(a[k] == b[k])) for k in a.files)
    return same / sum(a[k].size for k in a.files)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_TFDS / "cifar10").is_dir(),
                    reason="no CIFAR-10 copy in ../shared/tfds")
def test_two_processes_match_one_process_with_four_devices(tmp_path):
    args = CIFAR_ARGS + ["--max_steps", "6"]
    # The same data on one process with four devices, and GraSP's two chunks on one device
    # (the host loop) instead of one chunk on each of two devices: independent of the pair,
    # so started with it (their start-ups, mostly imports, overlap).
    others = {
        "one": _start([*args, "--num_cpu_devices", "4", "--workdir", str(tmp_path / "one")],
                      tmp_path / "one.log", _SAME_DATA_AS_TWO_PROCESSES),
        "solo": _start([*CIFAR_ARGS, "--max_steps", "1", "--num_cpu_devices", "1",
                        "--workdir", str(tmp_path / "solo")], tmp_path / "solo.log"),
    }
    try:
        codes, logs = _run_pair(args + ["--workdir", str(tmp_path / "pair")], tmp_path, "pair")
        for p in others.values():
            p.wait(timeout=400)
    finally:
        _kill(list(others.values()))
    assert codes == [0, 0], "\n\n".join(logs)
    for i in range(2):
        assert f"process {i} of 2: 2 local / 4 global cpu devices" in logs[i]
    assert "done: final test accuracy" in logs[0] and "done:" not in logs[1]  # process 0 logs
    for name, p in others.items():
        assert p.returncode == 0, (tmp_path / f"{name}.log").read_text()
    assert "data-parallel: 1 chunk(s) per device on 4 devices" in logs[0]

    # Masks: checked identical across the two processes at start-up (else exit 1); those of
    # 2x2 devices, 1x4 and 1x1 may differ only where summation order moves a tie at the
    # threshold.
    pair_vs_one = _agreement(tmp_path / "pair" / "masks.npz", tmp_path / "one" / "masks.npz")
    one_vs_solo = _agreement(tmp_path / "one" / "masks.npz", tmp_path / "solo" / "masks.npz")
    print(f"mask agreement: 2x2 vs 1x4 devices {pair_vs_one:.6%}, 1x4 vs 1x1 {one_vs_solo:.6%}")
    assert pair_vs_one >= 0.9999 and one_vs_solo >= 0.9999
    pair, single = _losses(tmp_path / "pair"), _losses(tmp_path / "one")
    assert len(pair) == 6
    np.testing.assert_allclose(pair, single, rtol=1e-5, atol=1e-6)
    res = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("pair", "one")]
    assert (res[0]["processes"], res[0]["devices"]) == (2, 4)
    assert (res[1]["processes"], res[1]["devices"]) == (1, 4)
    # Eval sums span every device of both processes: the same numbers as one process.
    assert res[0]["final_test_accuracy"] == pytest.approx(res[1]["final_test_accuracy"], abs=1e-6)
    assert res[0]["final_test_loss"] == pytest.approx(res[1]["final_test_loss"], rel=1e-5)


@pytest.mark.slow
def test_a_killed_process_stops_the_other_and_a_rerun_resumes(tmp_path):
    workdir = tmp_path / "w"
    args = ARGS + ["--max_steps", "200", "--checkpoint_every_steps", "4", "--workdir", str(workdir)]
    port = _free_port()
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = [_start(_pair_args(args, port, i), logs[i]) for i in range(2)]
    try:
        ckpts = workdir / "checkpoints"
        deadline = time.time() + 300
        while time.time() < deadline and not (
                ckpts.is_dir() and any(n.isdigit() and int(n) >= 8 for n in os.listdir(ckpts))):
            assert all(p.poll() is None for p in procs), "\n\n".join(l.read_text() for l in logs)
            time.sleep(0.2)
        assert ckpts.is_dir(), "no checkpoint written"
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        # The survivor must not hang: the runtime's heartbeat timeout (60 // 5 = 12 s here)
        # or the broken gloo connection ends it with an error.
        code = procs[0].wait(timeout=180)
        waited = time.time() - killed_at
    finally:
        _kill(procs)
    assert code != 0, logs[0].read_text()
    assert waited < 180
    print(f"survivor exited with {code} {waited:.1f}s after its peer was killed")

    saved = checkpointing.load_state(str(workdir))[0]
    assert saved >= 8
    args[args.index("--max_steps") + 1] = str(saved + 8)
    codes, out = _run_pair(args, tmp_path, "rerun")
    assert codes == [0, 0], "\n\n".join(out)
    assert f"resuming from step {saved}" in out[0]
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == saved + 8 and results["processes"] == 2
    assert checkpointing.load_state(str(workdir))[0] == saved + 8


@pytest.mark.slow
def test_a_process_later_than_gloos_connect_timeout_still_trains_with_the_other(tmp_path):
    codes, logs = _run_pair(ARGS + ["--max_steps", "2", "--workdir", str(tmp_path / "w")],
                            tmp_path, "late", script=_PROCESS_1_LATE_BY_40S)
    assert codes == [0, 0], "\n\n".join(logs)
    assert "done: final test accuracy" in logs[0]


@pytest.mark.slow
def test_processes_with_different_masks_stop_naming_the_odd_one(tmp_path):
    workdir = tmp_path / "w"
    codes, logs = _run_pair(ARGS + ["--max_steps", "2", "--workdir", str(workdir)], tmp_path,
                            "flip", script=_PROCESS_1_FLIPS_A_BIT)
    assert codes == [1, 1], "\n\n".join(logs)
    for i in range(2):
        assert (f"error (process {i}): the pruning masks of process(es) 1 differ from those of "
                "process 0") in logs[i], logs[i]
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


@pytest.mark.slow
def test_sigterm_on_one_process_stops_both_at_the_same_step_and_a_rerun_resumes(tmp_path):
    workdir = tmp_path / "w"
    args = ARGS + ["--max_steps", "12", "--log_every_steps", "4", "--workdir", str(workdir)]
    codes, logs = _run_pair(args, tmp_path, "term", script=_PROCESS_1_SIGTERM_AT_5)
    assert codes == [143, 143], "\n\n".join(logs)
    assert "masks agree across 2 processes (SHA-256 " in logs[0]
    assert "SIGTERM: saved a checkpoint at step 8" in logs[0]  # the next agreed step
    assert checkpointing.load_state(str(workdir))[0] == 8
    codes, logs = _run_pair(args, tmp_path, "resume")
    assert codes == [0, 0], "\n\n".join(logs)
    assert "resuming from step 8" in logs[0]
    assert json.loads((workdir / "results.json").read_text())["steps"] == 12


@pytest.mark.slow
def test_mismatched_num_processes_is_reported_and_both_exit(tmp_path):
    port = _free_port()
    common = ARGS + ["--max_steps", "2", "--workdir", str(tmp_path / "w"), "--num_cpu_devices", "2",
                     "--coordinator_address", f"127.0.0.1:{port}", "--distributed_timeout", "50"]
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = [_start(common + ["--num_processes", "2", "--process_id", "0"], logs[0]),
             _start(common + ["--num_processes", "3", "--process_id", "1"], logs[1])]
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        _kill(procs)
    out = [log.read_text() for log in logs]
    # Both learn of it together (the counts are compared after a barrier both join): neither
    # waits out a timeout for the other.
    assert codes == [1, 1], "\n\n".join(out)
    assert (f"--num_processes 3 on process 1, but the coordinator at 127.0.0.1:{port} runs 2 "
            "processes") in out[1]
    assert (f"process(es) 1 (--num_processes 3) disagree with the coordinator at 127.0.0.1:{port}"
            ", which runs 2 processes") in out[0]


def test_unreachable_coordinator_fails_in_bounded_time_naming_the_address(tmp_path):
    port = _free_port()  # nobody listens there
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "experiments.run", *ARGS, "--max_steps", "1",
                        "--workdir", str(tmp_path / "w"), "--coordinator_address",
                        f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", "1",
                        "--distributed_timeout", "5"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    elapsed = time.time() - start
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"127.0.0.1:{port}" in r.stderr and "within 5s" in r.stderr, r.stderr
    assert elapsed < 90
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--num_processes", "2"], "go together"),
    (["--coordinator_address", "localhost", "--num_processes", "2", "--process_id", "0"],
     "not HOST:PORT"),
    (["--coordinator_address", "localhost:1234", "--num_processes", "2", "--process_id", "2"],
     "--process_id 2"),
])
def test_inconsistent_launch_flags_are_refused(capsys, argv, needle):
    from experiments import run

    with pytest.raises(SystemExit) as e:
        run.main(ARGS + argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_mask_checksum_sees_one_flipped_bit():
    masks = {"a": np.ones((3, 5), bool), "b": {"k": np.zeros(7, bool)}}
    flipped = {"a": masks["a"].copy(), "b": masks["b"]}
    flipped["a"][2, 4] = False
    assert distributed.masks_digest(masks) == distributed.masks_digest(
        {"a": masks["a"].copy(), "b": {"k": masks["b"]["k"].copy()}})
    assert distributed.masks_digest(masks) != distributed.masks_digest(flipped)
    assert distributed.check_masks_agree(masks) is None  # one process: nothing to compare


def test_a_plain_machine_is_not_a_cluster(monkeypatch):
    for var in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.detected_cluster() is None
    # A SLURM job step with several tasks is one.
    for var, value in (("SLURM_JOB_ID", "7"), ("SLURM_STEP_NODELIST", "node[001-002]"),
                       ("SLURM_NTASKS", "2"), ("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0")):
        monkeypatch.setenv(var, value)
    assert distributed.detected_cluster() == "SlurmCluster"
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.detected_cluster() is None
