"""What GraSP scoring costs, in gradients: ``python -m benchmarks.grasp_cost``.

For each model at the paper's CIFAR-10 preset (100 images in two chunks of
50, T = 200), in one process, so that ratios are not at the mercy of a noisy
shared machine:

* XLA's FLOP count (``cost_analysis``) of ``grasp_scores``, in gradients of
  the same 100 images. An exact forward-over-reverse Hg doubles every bilinear
  op of the gradient (the tangent of a·b is ta·b + a·tb), so the floor is ~3.
  Three ways to the same scores: every chunk linearized at once (one program;
  taken when the residuals fit the memory budget); one chunk at a time in an
  eager call (``memory_budget_bytes=0``: a gradient program, then an HVP
  program, per chunk); and one chunk at a time inside one traced program
  (under ``jit``/``pmap`` with ``memory_budget_bytes=0``), where g must be
  summed before any Hg, so each chunk's forward and backward run twice.
* compile time (trace + lower + compile, cold) of ``grasp_scores`` against
  one jitted ``value_and_grad`` on the same batch (target: <= ~1.5x);
* the residual estimate that chooses the path, and XLA's peak memory;
* with ``--time``, the first eager call and the steady state.
"""

from __future__ import annotations

import argparse
import time

import jax

import grasp_jax as gj
from grasp_jax.accumulate import linearized_bytes, scoring_setup
from grasp_jax.models import get_model

from benchmarks.compiled import flops, peak_bytes
from experiments import jax_cache

ARCHS = ("resnet20", "resnet32", "vgg19")


def _compiled(fn, *args):
    """``jax.jit(fn)`` lowered and compiled cold, and the seconds it took."""
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t


def _timed(fn) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def measure(arch: str, batch_size: int, chunks: int, time_calls: bool) -> dict:
    model = get_model(arch, 10)
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (batch_size, 32, 32, 3))
    y = jax.random.randint(key, (batch_size,), 0, 10)
    variables = model.init(key, x[:2], train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    batch = {"image": x, "label": y}

    def loss_fn(p, b):
        logits, _ = model.apply({"params": p, "batch_stats": batch_stats}, b["image"],
                                train=True, mutable=["batch_stats"])
        return gj.cross_entropy_with_temperature(logits, b["label"], 200.0)

    r = {"arch": arch}
    grad_c, r["compile_grad_s"] = _compiled(jax.value_and_grad(loss_fn), params, batch)
    grasp_c, r["compile_grasp_s"] = _compiled(
        lambda p, b: gj.grasp_scores(p, loss_fn, b, num_microbatches=chunks), params, batch)
    setup = scoring_setup(params, loss_fn, batch, num_microbatches=chunks)
    r["residual_bytes"] = linearized_bytes(params, batch, setup)
    r["budget_bytes"] = gj.accumulate.default_memory_budget()
    r["peak_grasp_bytes"], r["peak_grad_bytes"] = peak_bytes(grasp_c), peak_bytes(grad_c)
    # The eager one-chunk-at-a-time path runs a gradient program and an HVP
    # program per chunk: the same programs as these two on one chunk.
    chunk = jax.tree_util.tree_map(lambda a: a[:batch_size // chunks], batch)
    add_g, _ = _compiled(lambda p, c: gj.accumulate.accumulate_gradient(p, loss_fn, c),
                         params, chunk)
    add_hg, _ = _compiled(lambda p, c: gj.accumulate.accumulate_hvp(p, loss_fn, c, p),
                          params, chunk)
    traced, _ = _compiled(lambda p, b: gj.grasp_scores(p, loss_fn, b, num_microbatches=chunks,
                                                       memory_budget_bytes=0), params, batch)
    g = flops(grad_c)
    r["grasp_flop_gradients"] = flops(grasp_c) / g
    r["eager_one_at_a_time_flop_gradients"] = chunks * (flops(add_g) + flops(add_hg)) / g
    r["traced_one_at_a_time_flop_gradients"] = flops(traced) / g
    if time_calls:
        # A fresh loss_fn object: nothing of the above is reused.
        def fresh(p, b):
            return loss_fn(p, b)

        r["first_call_s"] = _timed(lambda: gj.grasp_scores(params, fresh, batch,
                                                           num_microbatches=chunks))
        r["steady_s"] = _timed(lambda: gj.grasp_scores(params, fresh, batch,
                                                       num_microbatches=chunks))
        r["grad_s"] = _timed(lambda: grad_c(params, batch))
    return r


def report(r: dict) -> str:
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:,.0f} MiB"  # noqa: E731
    lines = [
        f"{r['arch']}: grasp_scores {r['grasp_flop_gradients']:.2f} gradients of FLOPs (one "
        f"chunk at a time: eager {r['eager_one_at_a_time_flop_gradients']:.2f}, traced "
        f"{r['traced_one_at_a_time_flop_gradients']:.2f}); compile {r['compile_grasp_s']:.1f} s "
        f"vs gradient {r['compile_grad_s']:.1f} s = "
        f"{r['compile_grasp_s'] / r['compile_grad_s']:.2f}x",
        f"    residuals {mib(r['residual_bytes'])} (budget {mib(r['budget_bytes'])}); XLA peak "
        f"grasp {mib(r['peak_grasp_bytes'])}, gradient {mib(r['peak_grad_bytes'])}",
    ]
    if "first_call_s" in r:
        lines.append(f"    first eager call {r['first_call_s']:.1f} s, steady "
                     f"{r['steady_s']:.2f} s = {r['steady_s'] / r['grad_s']:.2f} gradients of time")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--time", action="store_true", help="also time the eager calls")
    jax_cache.add_flag(parser, default=jax_cache.DISABLED)
    args = parser.parse_args(argv)
    jax_cache.enable(args.compilation_cache)
    print(f"{jax.default_backend()} ({jax.devices()[0].device_kind}), batch {args.batch} in "
          f"{args.chunks} chunks, jax {jax.__version__}")
    results = []
    for arch in args.archs.split(","):
        results.append(measure(arch, args.batch, args.chunks, args.time))
        print(report(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()
