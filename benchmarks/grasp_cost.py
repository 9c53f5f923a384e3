"""What GraSP scoring costs, in gradients: ``python -m benchmarks.grasp_cost``.

Prints, for one model at one batch, in one process (so the ratio is not at the
mercy of a noisy shared machine):

* steady-state ``grasp_scores`` time / steady-state jitted ``value_and_grad``
  time on the same batch (target: <= 2.5; a forward-over-reverse HVP costs
  about two gradients and g one more, and ``jax.linearize`` shares the
  primal gradient between them);
* compile times;
* XLA's peak memory estimate (arguments + outputs + temporaries of the
  compiled program) with and without microbatching;
* XLA's FLOP count (``cost_analysis``) of the same programs, in gradients.
  An exact forward-over-reverse Hg doubles every bilinear op of the
  gradient (the tangent of a·b is ta·b + a·tb), so with g shared through
  ``jax.linearize`` one chunk costs ~3 gradients of FLOPs; with k chunks g
  is summed before any Hg, so each chunk's forward and input backward run
  again in the Hg pass (~3.7). How far the timed ratio sits below the FLOP
  ratio says how much of the gradient's time is not FLOPs.

``--flops_only`` compiles and counts without timing anything (a minute or
two per model), so it gives the same numbers on a loaded machine.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

import grasp_jax as gj
from grasp_jax import scoring
from grasp_jax.models import get_model

from benchmarks.compiled import flops, peak_bytes


def _time(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` (already compiled) over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vgg19")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flops_only", action="store_true",
                        help="count XLA FLOPs of the gradient and grasp_scores programs; no timing")
    args = parser.parse_args(argv)

    model = get_model(args.arch, args.num_classes)
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (args.batch, args.image_size, args.image_size, 3))
    y = jax.random.randint(key, (args.batch,), 0, args.num_classes)
    variables = model.init(key, x[:2], train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    batch = {"image": x, "label": y}

    def loss_fn(p, b):
        logits, _ = model.apply({"params": p, "batch_stats": batch_stats}, b["image"], train=True,
                                mutable=["batch_stats"])
        return gj.cross_entropy_with_temperature(logits, b["label"], 200.0)

    flags = gj.prunable_flags(params)
    results = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
               "arch": args.arch, "batch": args.batch}

    t = time.perf_counter()
    grad_c = jax.jit(jax.value_and_grad(loss_fn)).lower(params, batch).compile()
    results["compile_grad_s"] = time.perf_counter() - t
    if args.flops_only:
        return _flop_ratios(args, params, batch, loss_fn, flags, grad_c, results)
    results["grad_s"] = _time(lambda: grad_c(params, batch), args.repeats)

    for k in sorted({1, args.microbatches}):
        score = functools.partial(gj.grasp_scores, params, loss_fn, batch, num_microbatches=k)
        t = time.perf_counter()
        jax.block_until_ready(score())
        first = time.perf_counter() - t
        results[f"grasp_k{k}_s"] = _time(score, args.repeats)
        results[f"compile_grasp_k{k}_s"] = max(first - results[f"grasp_k{k}_s"], 0.0)
        if k == 1:
            compiled = scoring._grasp_scores.lower(
                params, batch, loss_fn=loss_fn, flags=flags, num_microbatches=1, axis_name=None).compile()
        else:
            # Eager microbatched scoring runs one program per chunk; its Hg
            # program is the larger of the two.
            theta = [x for x, f in zip(jax.tree_util.tree_leaves(params), flags) if f]
            chunk = scoring._chunk(batch, 0, args.batch // k)
            compiled = scoring._add_chunk_hvp.lower(
                params, chunk, theta, theta, loss_fn=loss_fn, flags=flags).compile()
        results[f"peak_grasp_k{k}_bytes"] = peak_bytes(compiled)
    results["peak_grad_bytes"] = peak_bytes(grad_c)

    g = results["grad_s"]
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:,.0f} MiB"
    print(f"{args.arch}, batch {args.batch}, {results['backend']} ({results['device']})")
    print(f"  value_and_grad           {g * 1e3:9.1f} ms   compile {results['compile_grad_s']:.1f} s   peak {mib(results['peak_grad_bytes'])}")
    for k in sorted({1, args.microbatches}):
        s = results[f"grasp_k{k}_s"]
        print(f"  grasp_scores (k={k:<2})     {s * 1e3:9.1f} ms = {s / g:.2f} gradients   "
              f"compile {results[f'compile_grasp_k{k}_s']:.1f} s   peak {mib(results[f'peak_grasp_k{k}_bytes'])}")
    return results


def _flop_ratios(args, params, batch, loss_fn, flags, grad_c, results) -> dict:
    k = args.microbatches
    theta = [x for x, f in zip(jax.tree_util.tree_leaves(params), flags) if f]
    chunk = scoring._chunk(batch, 0, args.batch // k)
    one = scoring._grasp_scores.lower(params, batch, loss_fn=loss_fn, flags=flags,
                                      num_microbatches=1, axis_name=None).compile()
    # The eager k-chunk call: k gradient programs, then k Hg programs, one chunk each.
    add_g = scoring._add_chunk_grad.lower(params, chunk, theta, loss_fn=loss_fn, flags=flags).compile()
    add_hg = scoring._add_chunk_hvp.lower(params, chunk, theta, theta, loss_fn=loss_fn,
                                          flags=flags).compile()
    g, f_one, f_add_g, f_add_hg = (flops(c) for c in (grad_c, one, add_g, add_hg))
    if None in (g, f_one, f_add_g, f_add_hg):
        raise SystemExit(f"XLA reports no FLOP count on the {jax.default_backend()} backend")
    results.update(grad_flops=g, grasp_k1_flop_gradients=f_one / g,
                   **{f"grasp_k{k}_flop_gradients": k * (f_add_g + f_add_hg) / g})
    print(f"{args.arch}, batch {args.batch}: value_and_grad {g / 1e9:,.1f} GFLOP; grasp_scores "
          f"k=1 {results['grasp_k1_flop_gradients']:.2f} gradients, k={k} "
          f"{results[f'grasp_k{k}_flop_gradients']:.2f} gradients of FLOPs (XLA cost_analysis)")
    return results


if __name__ == "__main__":
    main()
