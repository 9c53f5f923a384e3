"""What deciding backend choices at lowering costs: ``python -m benchmarks.lowering``.

The default convolution (its CPU fast path and fusion barrier) and the chunk
loop's unrolling are staged with ``lax.platform_dependent``, so the platform a
program is lowered for picks them and a program exported for cuda or tpu from
a CPU host holds none of the CPU's choices. Under ``jit`` both branches are
traced (and differentiated). This script measures that cost against the
former mechanism, a choice made while tracing for the process's default
backend (reproduced here by resolving every ``platform_dependent`` at trace
time), alternating the two in one process so that the ratios are not at the
mercy of a shared machine:

* trace + lower, and compile (XLA:CPU, cold) of ResNet-32 ``grasp_scores``
  (the CIFAR-10 preset: 100 images in two chunks of 50, T = 200) and of one
  jitted training gradient (batch 128);
* export for cuda from this host: seconds and the convolutions, dot_generals
  and ``case`` ops in the StableHLO (``case`` here: the one-branch selects of
  the platform index, which XLA folds away; the barrier's two-branch cond is
  gone);
* the residual estimate that chooses grasp_scores' path (the partial
  evaluation of a ``platform_dependent`` keeps both branches' residuals);
* that the CPU results of the two mechanisms are bit-identical.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import time
from collections.abc import Callable, Iterator
from unittest import mock

import jax
import numpy as np
from jax import lax

import grasp_jax as gj
from grasp_jax import accumulate, diagnostics, platforms
from grasp_jax.accumulate import linearized_bytes, scoring_setup
from grasp_jax.models import get_model

from experiments import jax_cache

#: trace-time: every choice made while tracing, for the default backend (before);
#: per-op: each convolution and chunk loop stages its own choice (no program-level one);
#: per-program: the scoring programs traced once per platform (the library's default).
MECHANISMS = ("trace-time", "per-op", "per-program")


@contextlib.contextmanager
def choices_at_trace_time() -> Iterator[None]:
    """Every ``lax.platform_dependent`` resolved while tracing, for the default backend:
    the programs the project traced before the choice moved to lowering."""

    def at_trace(*args, default=None, **branches):
        return branches.get(jax.default_backend(), default)(*args)

    with mock.patch.object(lax, "platform_dependent", at_trace):
        yield


@contextlib.contextmanager
def choices_per_op() -> Iterator[None]:
    """No program traced once per platform: every choice is staged where it is made."""
    once = lambda fn, *args: fn(*args)  # noqa: E731
    with contextlib.ExitStack() as stack:
        for module in (accumulate, diagnostics, platforms):
            stack.enter_context(mock.patch.object(module, "per_platform", once))
        yield


SCOPES = {"trace-time": choices_at_trace_time, "per-op": choices_per_op,
          "per-program": contextlib.nullcontext}


def _programs(batch_size: int, chunks: int) -> tuple[dict[str, Callable], tuple, tuple]:
    model = get_model("resnet32", 10)
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (128, 32, 32, 3))
    y = jax.random.randint(key, (128,), 0, 10)
    variables = model.init(key, x[:2], train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]

    def loss_fn(p, b, temperature=1.0):
        logits, _ = model.apply({"params": p, "batch_stats": batch_stats}, b["image"],
                                train=True, mutable=["batch_stats"])
        return gj.cross_entropy_with_temperature(logits, b["label"], temperature)

    def scoring_loss(p, b):
        return loss_fn(p, b, 200.0)

    programs = {
        "grasp_scores": lambda p, b: gj.grasp_scores(p, scoring_loss, b,
                                                     num_microbatches=chunks),
        "train gradient": jax.value_and_grad(loss_fn),
        # As the runner's train step: the gradient traced once per platform.
        "train gradient, per_platform": lambda p, b: platforms.per_platform(
            jax.value_and_grad(loss_fn), p, b),
    }
    score_batch = {"image": x[:batch_size], "label": y[:batch_size]}
    train_batch = {"image": x, "label": y}
    args = {"grasp_scores": (params, score_batch), "train gradient": (params, train_batch),
            "train gradient, per_platform": (params, train_batch)}
    setup = scoring_setup(params, scoring_loss, score_batch, num_microbatches=chunks)
    return programs, args, (params, score_batch, setup)


def _op_counts(text: str) -> dict[str, int]:
    return {op: len(re.findall(rf"stablehlo\.{op}\b", text))
            for op in ("convolution", "dot_general", "case")}


def measure_once(mechanism: str, programs: dict, args: dict, scoring: tuple) -> dict:
    """Times and op counts of every program under one mechanism, from cold caches."""
    jax.clear_caches()
    out = {}
    with SCOPES[mechanism]():
        for name, fn in programs.items():
            t0 = time.perf_counter()
            lowered = jax.jit(fn).trace(*args[name]).lower()
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            exported = jax.export.export(jax.jit(fn), platforms=("cuda",))(*args[name])
            t3 = time.perf_counter()
            result = jax.device_get(compiled(*args[name]))
            out[name] = {"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "export_cuda_s": t3 - t2,
                         "cuda_ops": _op_counts(exported.mlir_module()), "result": result}
        out["residual_bytes"] = linearized_bytes(*scoring)
    return out


def _identical(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2,
                        help="alternating rounds of both mechanisms; the minimum is reported")
    jax_cache.add_flag(parser, default=jax_cache.DISABLED)
    args = parser.parse_args(argv)
    jax_cache.enable(args.compilation_cache)
    programs, call_args, scoring = _programs(args.batch, args.chunks)
    runs: dict[str, list[dict]] = {m: [] for m in MECHANISMS}
    for _ in range(args.repeats):
        for mechanism in MECHANISMS:
            runs[mechanism].append(measure_once(mechanism, programs, call_args, scoring))
    print(f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
          f"ResNet-32, min of {args.repeats} alternating runs (seconds)")
    before = runs["trace-time"]
    for name in programs:
        print(f"{name}:")
        for what in ("trace_lower_s", "compile_s", "export_cuda_s"):
            b = min(r[name][what] for r in before)
            cells = [f"trace-time {b:6.2f}"]
            for mechanism in MECHANISMS[1:]:
                a = min(r[name][what] for r in runs[mechanism])
                cells.append(f"{mechanism} {a:6.2f} = {a / b:.2f}x")
            print(f"  {what:14s} " + "   ".join(cells))
        for mechanism, rs in runs.items():
            same = _identical(before[0][name]["result"], rs[0][name]["result"])
            print(f"  {mechanism:12s} cuda export ops {rs[0][name]['cuda_ops']}, CPU results "
                  f"bit-identical to trace-time: {same}")
    rb = before[0]["residual_bytes"]
    print("grasp_scores residual estimate: " + ", ".join(
        f"{m} {rs[0]['residual_bytes'] / 2**20:,.0f} MiB ({rs[0]['residual_bytes'] / rb:.2f}x)"
        for m, rs in runs.items()))
    return runs


if __name__ == "__main__":
    main()
