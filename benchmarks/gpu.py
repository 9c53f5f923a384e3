"""One script for a lent accelerator: ``python -m benchmarks.gpu`` (the benchmark table and a
reduced reproduction, so that one short loan of a GPU or TPU yields both).

On one GPU (or a TPU VM, on all its local chips), within about ten minutes, in this order:

1. the benchmark table: for VGG19 and ResNet-32 at the paper's CIFAR-10 scoring preset
   (100 images in two chunks, T = 200), ``grasp_scores``' first call (compile included) and
   steady state against one jitted ``value_and_grad`` of the same batch, compile times, XLA's
   FLOP count in gradients and its peak memory (``benchmarks.grasp_cost.measure``); then the
   masked train step's images/s at batch 128 (``benchmarks.train_step.bench``);
2. a reduced reproduction: ``python -m experiments.sweep`` of VGG19 on CIFAR-10, GraSP, SNIP
   and random at 98% sparsity, one seed, a few epochs, from ``--data_dir`` (default
   ``../shared/tfds``);

then writes both, with the backend, the device kind and the device count and the time taken,
between the ``gpu-benchmark`` and ``gpu-reproduction`` markers of ``docs/GPU.md`` (or
``--out``). It runs on any backend and only reports what it found; ``--tiny`` shrinks
everything (LeNet-5, 8 images, one train step, digits) so that CI runs it on a CPU.

A fresh machine has no CIFAR-10: the script downloads nothing, so it then writes the
benchmark tables, marks the reproduction as skipped with the command that prepares the data
(and how to point ``--data_dir`` at a prepared copy), and exits 0.

The benchmarks run in a child process that exits before the sweep starts: a TPU can be
opened by one process at a time, so this process never initializes a JAX backend itself.

The time budget stops adding work: no benchmark starts after ``--bench_budget_s``, and the
sweep is asked to stop (SIGTERM: the running cell checkpoints, the sweep writes its report;
rerun to resume) at ``--budget_s`` from the start. JAX's persistent compilation cache is
enabled first (``--compilation_cache``, forwarded to the sweep's cells), so a figure that
includes compilation is cold only on a fresh cache; the page says how full it was.

    python -m benchmarks.gpu                          # the GPU run, writes docs/GPU.md
    python -m benchmarks.gpu --tiny --out /tmp/g.md --sweep_dir /tmp/g_sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.sections import replace_section
from experiments import jax_cache

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "GPU.md"
BENCH_SECTION, SWEEP_SECTION = "gpu-benchmark", "gpu-reproduction"
SWEEP_METHODS = "grasp,snip,random"
SPARSITY = "0.98"
STOP_GRACE_S = 60  # how long a stopped sweep gets to checkpoint its cell and write its report


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one run measures and trains: the full GPU run or its ``--tiny`` CPU copy."""

    archs: tuple[str, ...]  # benchmarked networks (CIFAR-10 shapes, 10 classes)
    score_batch: int  # images scored by grasp_scores
    chunks: int  # ... in this many chunks
    train_batch: int  # global batch of the timed train step
    pairs: int  # timed (masked, plain) train-step pairs
    sweep_flags: tuple[str, ...]  # dataset, network and length of the reduced reproduction


def sizes_for(tiny: bool, epochs: int, data_dir: str, dataset: str | None = None) -> Sizes:
    """``dataset`` is the reproduction's (default: digits with ``tiny``, else cifar10)."""
    dataset = dataset or ("digits" if tiny else "cifar10")
    # digits is bundled with scikit-learn; every other dataset is read from the TFDS root.
    data = () if dataset == "digits" else ("--data_dir", os.path.abspath(data_dir))
    if tiny:
        return Sizes(("lenet5",), 8, 2, 8, 1, ("--dataset", dataset, "--arch", "lenet5",
                                               "--max_steps", "1", "--batch_size", "32", *data))
    return Sizes(("vgg19", "resnet32"), 100, 2, 128, 8,
                 ("--dataset", dataset, "--arch", "vgg19", "--epochs", str(epochs), *data))


def divisible_batch(batch: int, devices: int) -> int:
    """The largest multiple of ``devices`` not above ``batch`` (at least one image per device).

    The pmapped step gives every device the same share of the global batch, so a machine
    whose device count does not divide the preset's batch (three GPUs, say) runs this one.
    """
    return max(devices, batch - batch % devices)


def _flag(flags: Sequence[str], name: str) -> str | None:
    return flags[flags.index(name) + 1] if name in flags else None


def with_batch(flags: Sequence[str], devices: int) -> tuple[str, ...]:
    """The sweep's ``flags`` with a ``--batch_size`` that divides over ``devices``.

    Unchanged where the given batch, or else the preset's, divides already.
    """
    from experiments import configs

    flags = list(flags)
    given = _flag(flags, "--batch_size")
    batch = int(given) if given is not None else configs.resolve(
        dataset=_flag(flags, "--dataset"), arch=_flag(flags, "--arch"),
        steps_per_epoch=1).batch_size
    fitted = divisible_batch(batch, devices)
    if fitted == batch:
        return tuple(flags)
    if given is not None:
        flags[flags.index("--batch_size") + 1] = str(fitted)
        return tuple(flags)
    return (*flags, "--batch_size", str(fitted))


def prepare_command(dataset: str, data_dir: str) -> str:
    """The one line that downloads and prepares ``dataset`` into the TFDS root ``data_dir``."""
    return ("python -c \"import tensorflow_datasets as tfds; "
            f"tfds.builder('{dataset}', data_dir='{data_dir}').download_and_prepare()\"")


def missing_data(dataset: str, data_dir: str) -> str | None:
    """None if the reproduction can read ``dataset``; else why not and how to prepare it.

    Asks TFDS whether the builder's version folder under ``data_dir`` is prepared; it
    contacts nothing. Datasets not read through TFDS (digits) are never missing.
    """
    from grasp_jax.data import registry, sources

    info = registry.DATASETS[dataset]
    if info.source is not sources.tfds_source:
        return None
    import tensorflow_datasets as tfds

    root = os.path.abspath(data_dir)
    builder = tfds.builder(dataset, data_dir=root)
    if builder.is_prepared():
        return None
    return "\n".join([
        f"Skipped: {dataset} is not prepared in `{root}` (TFDS looked for "
        f"`{builder.data_dir}`), and this script downloads nothing.", "",
        "To run it, prepare the data once on a machine with internet access:", "",
        "```",
        prepare_command(dataset, root),
        "```", "",
        f"(or `tfds build {dataset} --data_dir={root}`), then rerun the script; or copy a "
        f"prepared `{dataset}/` folder from another machine, and point the script at the "
        "folder that holds it with `--data_dir /path/to/tensorflow_datasets`."])


class Budget:
    """Seconds since the start, against the two limits."""

    def __init__(self, bench_s: float, total_s: float) -> None:
        self.start, self.bench_s, self.total_s = time.perf_counter(), bench_s, total_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def bench_over(self) -> bool:
        return self.elapsed() > self.bench_s

    def left(self) -> float:
        return self.total_s - self.elapsed()


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def _x(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}x"


GRASP_HEADER = ("| network | first call (s) | steady (s) | value_and_grad (s) | steady / gradient "
                "| compile grasp / gradient (s) | XLA FLOPs (gradients) | XLA peak grasp / "
                "gradient (MiB) |\n|---|---:|---:|---:|---:|---:|---:|---:|")
TRAIN_HEADER = ("| network | batch | masked step (ms) | images/s | compile (s) | mask overhead |\n"
                "|---|---:|---:|---:|---:|---:|")


def grasp_row(r: dict) -> str:
    """One row of the scoring table from ``benchmarks.grasp_cost.measure(..., time_calls=True)``."""
    flop = r["grasp_flop_gradients"]
    return (f"| {r['arch']} | {r['first_call_s']:.2f} | {r['steady_s']:.3f} | {r['grad_s']:.4f} | "
            f"{_x(r['steady_s'], r['grad_s'])} | {r['compile_grasp_s']:.1f} / "
            f"{r['compile_grad_s']:.1f} | {'n/a' if flop is None else f'{flop:.2f}'} | "
            f"{_mib(r['peak_grasp_bytes'])} / {_mib(r['peak_grad_bytes'])} |")


def train_row(r: dict, batch: int) -> str:
    """One row of the throughput table from ``benchmarks.train_step.bench``."""
    return (f"| {r['arch']} | {batch} | {r['masked_step_s'] * 1e3:.1f} | "
            f"{r['images_per_s']:,.0f} | {r['compile_s']:.1f} | {r['overhead']:+.1%} |")


def skipped_row(arch: str, columns: int) -> str:
    return f"| {arch} | skipped: time budget spent |" + " |" * (columns - 2)


def benchmark_tables(sizes: Sizes, budget: Budget) -> str:
    """Both tables as markdown; a model is skipped once the benchmark budget is spent.

    The scoring table runs on one device (``grasp_scores`` eagerly, as a user calls it); the
    train step is the runner's pmapped step over every local device, its global batch
    divided evenly among them.
    """
    import jax

    from benchmarks import grasp_cost, train_step  # they import JAX: after the cache is set

    train_batch = divisible_batch(sizes.train_batch, jax.local_device_count())
    grasp_rows, train_rows = [], []
    for arch in sizes.archs:
        if budget.bench_over():
            grasp_rows.append(skipped_row(arch, 8))
            continue
        r = grasp_cost.measure(arch, sizes.score_batch, sizes.chunks, time_calls=True)
        grasp_rows.append(grasp_row(r))
        print(grasp_rows[-1], flush=True)
    for arch in sizes.archs:
        if budget.bench_over():
            train_rows.append(skipped_row(arch, 6))
            continue
        r = train_step.bench(arch, train_batch, sizes.pairs, float(SPARSITY))
        train_rows.append(train_row(r, train_batch))
        print(train_rows[-1], flush=True)
    return "\n".join([
        f"`grasp_scores` on {sizes.score_batch} CIFAR-shaped images in {sizes.chunks} chunks, "
        "T = 200, eager on one device (`benchmarks.grasp_cost.measure`): first call with "
        "compilation, then the steady state, against one call of the jitted `value_and_grad` "
        "of the same loss and batch; XLA's FLOPs in gradients and peak memory of the compiled "
        "programs.", "",
        GRASP_HEADER, *grasp_rows, "",
        f"Train step of `experiments.steps` with `masked_updates` at {SPARSITY} sparsity, "
        f"pmapped over all {jax.local_device_count()} local device(s) "
        f"(`benchmarks.train_step.bench`, median of {sizes.pairs} alternating masked/plain "
        "step pairs; overhead = masked / plain - 1).", "",
        TRAIN_HEADER, *train_rows])


def device_summary() -> dict:
    """What the page says about the machine: backend, device kind and count, jax version."""
    import jax

    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__}


def bench_stage(args: argparse.Namespace) -> int:
    """The child process: measures the tables and writes them, with the device, as JSON."""
    jax_cache.enable(args.compilation_cache)
    sizes = sizes_for(args.tiny, args.epochs, args.data_dir, args.dataset)
    result = {"tables": benchmark_tables(sizes, Budget(args.bench_budget_s, args.budget_s)),
              **device_summary()}
    Path(args.bench_json).write_text(json.dumps(result))
    return 0


def run_bench_stage(args: argparse.Namespace, cache: str | None,
                    budget: Budget) -> tuple[dict | None, int]:
    """(the child's JSON, its exit status): the benchmarks in a process of their own.

    Its budget is what is left of this process's, so no benchmark starts after
    ``--bench_budget_s`` from this script's start.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "benchmarks.gpu", "--bench_json", str(out),
               "--bench_budget_s", str(args.bench_budget_s - budget.elapsed()),
               "--budget_s", str(args.budget_s - budget.elapsed()),
               "--compilation_cache", cache or jax_cache.DISABLED,
               *(["--tiny"] if args.tiny else [])]
        status = subprocess.run(cmd, cwd=REPO).returncode
        return (json.loads(out.read_text()) if out.exists() else None), status


def sweep_command(sweep_dir: str, methods: str, sizes: Sizes, cache: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "experiments.sweep", "--sweep_dir", sweep_dir, "--methods",
           methods, "--sparsities", SPARSITY, "--seeds", "0", "--quiet",
           *sizes.sweep_flags]
    return cmd + (["--", "--compilation_cache", cache] if cache else [])


def run_until(cmd: Sequence[str], seconds: float) -> tuple[int, bool]:
    """(exit status, whether it was stopped) of ``cmd``, sent SIGTERM after ``seconds``."""
    proc = subprocess.Popen(list(cmd), cwd=REPO)
    try:
        return proc.wait(timeout=max(seconds, 1.0)), False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the sweep stops its cell, which checkpoints
        try:
            return proc.wait(timeout=STOP_GRACE_S), True
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(), True


def sweep_results(sweep_dir: str) -> str:
    """The sweep's results.md without its title and plots (their paths are the sweep's)."""
    path = Path(sweep_dir) / "results.md"
    if not path.exists():
        return f"No cell finished: `{path}` was not written."
    lines = [ln for ln in path.read_text().splitlines()
             if not ln.startswith("# ") and not ln.startswith("![")]
    return "\n".join(lines).strip()


def reproduction(cmd: Sequence[str], sweep_dir: str, budget: Budget,
                 missing: str | None = None) -> tuple[str, int]:
    """(markdown of the reduced reproduction, the sweep's exit status; -1 if not started).

    ``missing`` (from :func:`missing_data`) skips it: nothing to read is not a failure.
    """
    if missing is not None:
        print(missing, flush=True)
        return missing, -1
    if budget.left() <= 0:
        return "Not run: the time budget was spent by the benchmarks.", -1
    print("$", " ".join(cmd), flush=True)
    started = budget.elapsed()
    status, stopped = run_until(cmd, budget.left())
    took = budget.elapsed() - started
    note = (f"Stopped at the time budget after {took:.0f} s (exit {status}); rerunning this "
            "script or the command above resumes it." if stopped
            else f"Took {took:.0f} s (exit {status}).")
    shown = " ".join(["python", *cmd[1:]]).replace(str(REPO) + os.sep, "")
    return "\n\n".join([f"`{shown}`", note, sweep_results(sweep_dir)]), status


def machine_line(started: datetime.datetime, took_s: float, cache: str | None,
                 cache_entries: int, device: dict | None) -> str:
    cache_note = ("no compilation cache" if cache is None else
                  f"compilation cache `{cache}` ({cache_entries} entries before this run)")
    where = ("Device: unknown (the benchmark process failed before it reported one)"
             if device is None else
             f"Device: **{device['device_kind']}** ({device['backend']}, "
             f"{device['device_count']} device(s)), jax {device['jax']}")
    return f"{where}; run {started:%Y-%m-%d %H:%M} UTC, took {took_s:.0f} s; {cache_note}."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="LeNet-5, 8 images, 1 train step, digits: a CPU smoke run for CI")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="page whose marked sections are rewritten")
    p.add_argument("--sweep_dir", default=None,
                   help="the reduced reproduction's sweep (default: runs/gpu_reduced, or "
                        "runs/gpu_tiny with --tiny); rerunning resumes it")
    p.add_argument("--methods", default=SWEEP_METHODS,
                   help="pruning methods of the reproduction (the sweep's --methods)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of each reproduction cell")
    p.add_argument("--data_dir", default="../shared/tfds",
                   help="TFDS root holding the prepared dataset (a folder with cifar10/ in it); "
                        "without it the reproduction is skipped and the page says how to "
                        "prepare it")
    p.add_argument("--dataset", choices=("cifar10", "digits"), default=None,
                   help="the reproduction's dataset (default: cifar10; digits with --tiny)")
    p.add_argument("--budget_s", type=float, default=510.0,
                   help="the sweep is stopped this many seconds after the start")
    p.add_argument("--bench_budget_s", type=float, default=240.0,
                   help="no benchmark starts after this many seconds")
    p.add_argument("--compilation_cache", default=None,
                   help=f"JAX cache directory (default: {jax_cache.default_dir()}); "
                        f"'{jax_cache.DISABLED}' for cold compiles")
    # Internal: the child process that runs the benchmarks writes its results here.
    p.add_argument("--bench_json", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset == "digits" and not args.tiny:
        parser.error("--dataset digits only with --tiny: VGG19 needs 32x32 images")
    # The sweep's cells share the device with the benchmarks: none may grab 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.bench_json:
        return bench_stage(args)
    cache = jax_cache.enable(args.compilation_cache)  # sets a flag; initializes no backend
    cache_entries = len(os.listdir(cache)) if cache else 0
    started = datetime.datetime.now(datetime.timezone.utc)
    budget = Budget(args.bench_budget_s, args.budget_s)
    sizes = sizes_for(args.tiny, args.epochs, args.data_dir, args.dataset)
    sweep_dir = os.path.abspath(args.sweep_dir or str(
        REPO / "runs" / ("gpu_tiny" if args.tiny else "gpu_reduced")))

    device, bench_status = run_bench_stage(args, cache, budget)
    tables = (device["tables"] if device is not None else
              f"The benchmark process failed (exit {bench_status}); see its terminal output.")
    bench_s = budget.elapsed()
    flags = (sizes.sweep_flags if device is None else
             with_batch(sizes.sweep_flags, device["device_count"]))
    # Forwarded only when given (the cells' own default is the same per-user directory), and
    # resolved here: the cells run in the repository, maybe not in this directory.
    forwarded = None if args.compilation_cache is None else cache or jax_cache.DISABLED
    cmd = sweep_command(sweep_dir, args.methods, dataclasses.replace(sizes, sweep_flags=flags),
                        forwarded)
    missing = missing_data(_flag(flags, "--dataset"), args.data_dir)
    results, status = reproduction(cmd, sweep_dir, budget, missing)
    out = Path(args.out)
    for section, text, took in ((BENCH_SECTION, tables, bench_s),
                                (SWEEP_SECTION, results, budget.elapsed())):
        replace_section(out, section,
                        machine_line(started, took, cache, cache_entries, device) + "\n\n" + text)
    print(f"wrote {out} in {budget.elapsed():.0f} s", flush=True)
    # A failed benchmark process, a failed cell or refused flags; a stop or a skip is not.
    return 1 if bench_status != 0 or status in (1, 2) else 0


if __name__ == "__main__":
    sys.exit(main())
