"""The performance report: ``python -m benchmarks.run`` prints and writes ``docs/PERFORMANCE.md``.

For each model (lenet5, resnet20, resnet32, vgg19 on 32x32x3 CIFAR batches, resnet50 on
224x224x3 batches), in one process so that every ratio compares figures taken under the same
load of a shared machine:

* forward (eval mode, the eval step's work) and ``value_and_grad`` of the training loss (BatchNorm
  in training mode), each with the models' default convolution (``GRASP_JAX_FAST_CONV=auto``: the
  patches fast path where XLA:CPU is slow) and with ``lax.conv_general_dilated`` in every conv;
  runs of the two alternate, and the speed-up is the median of the per-round ratios;
* ``grasp_scores`` (one batch, default convolution) as a multiple of one gradient, alternating
  with gradient runs the same way;
* the pmap'ed train step of ``experiments.steps`` with and without ``masked_updates`` in the
  optax chain (alternating single steps; overhead = median of the paired ratios);
* compile times, and XLA's peak memory of each compiled program (``memory_analysis``: arguments
  + outputs + temporaries - aliased);
* the training input pipeline's images/s (CIFAR-10 from ``../shared/tfds`` if present, else
  scikit-learn digits).

  python -m benchmarks.run                        # everything: ~25 min on 2 busy shared CPU cores
  python -m benchmarks.run --quick                # fewer repeats, smaller batches (~3 min)
  python -m benchmarks.run --models vgg19 --batch 32 --out /tmp/perf.md
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

import grasp_jax as gj
from grasp_jax import models
from grasp_jax.models import conv as conv_lib

from benchmarks import train_step as train_step_bench
from benchmarks.compiled import flops, peak_bytes
from benchmarks.input_pipeline import DEFAULT_DATA_DIR, pipeline_images_per_second
from experiments import jax_cache, steps

# model -> (input HWC, classes, default batch, dataset whose optimizer preset the train step uses)
MODELS: dict[str, tuple[tuple[int, int, int], int, int, str]] = {
    "lenet5": ((32, 32, 3), 10, 64, "cifar10"),
    "resnet20": ((32, 32, 3), 10, 64, "cifar10"),
    "resnet32": ((32, 32, 3), 10, 64, "cifar10"),
    "vgg19": ((32, 32, 3), 10, 64, "cifar10"),
    "resnet50": ((224, 224, 3), 1000, 8, "imagenet2012"),
}
# The paper's models, for the grasp_scores target (lenet5 is a test/demo network).
PAPER_MODELS = ("resnet20", "resnet32", "vgg19", "resnet50")

TARGETS = {
    "vgg19_speedup": 3.5,  # VGG19 CIFAR gradient at batch 64 vs plain XLA conv
    "grasp_gradients": 2.5,  # grasp_scores in gradients, every paper model
    "mask_overhead": 0.03,  # masked train step vs unmasked
}

# Everything after this line in the report is hand-written interpretation, kept across reruns.
NOTES_MARKER = "<!-- notes below: kept by benchmarks.run when it rewrites this file -->"

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "PERFORMANCE.md"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _compile(jitted, *args, **kwargs):
    t = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - t


def _run(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def _alternate(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Wall times of ``rounds`` rounds, each running every fn once in turn (after one warm run)."""
    for fn in fns.values():
        _run(fn)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(_run(fn))
    return times


def _paired_ratio(a: list[float], b: list[float]) -> float:
    return float(np.median(np.asarray(a) / np.asarray(b)))


def _count_fast_convs(arch: str, num_classes: int, variables: Any, x: jax.Array) -> tuple[int, int]:
    """(convs the default convolution takes the patches path for, all convs) in one forward trace.

    "Fast" includes auto mode's 1x1 convs, whose values stay native and whose derivatives
    are the patches formulation's matmuls.
    """
    decisions: list[bool] = []

    def recording(*args, precision=None, preferred_element_type=None, **kwargs):
        decisions.append(conv_lib.uses_fast_path(*args, **kwargs))
        return conv_lib.conv_general_dilated(
            *args, precision=precision, preferred_element_type=preferred_element_type, **kwargs
        )

    conv = functools.partial(models.Conv, conv_general_dilated=recording)
    model = models.get_model(arch, num_classes, conv=conv)
    jax.eval_shape(lambda v, im: model.apply(v, im, train=False), variables, x)
    return sum(decisions), len(decisions)


def bench_model(
    arch: str,
    batch: int,
    rounds: int,
    pairs: int,
    sparsity: float,
    log: Callable[[str], None] = print,
) -> dict:
    shape, num_classes, _, dataset = MODELS[arch]
    r: dict[str, Any] = {"arch": arch, "batch": batch, "input": "x".join(map(str, shape))}
    key = jax.random.PRNGKey(0)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, num_classes, size=(batch,)), jnp.int32)
    data = {"image": x, "label": y}
    convs = {
        "auto": models.get_model(arch, num_classes),  # the default: fast where it wins
        "native": models.get_model(arch, num_classes, conv=models.NativeConv),
    }
    t = time.perf_counter()
    variables = jax.block_until_ready(steps.init_variables(convs["native"], key, shape))
    r["init_s"] = time.perf_counter() - t  # includes compiling the initializers
    params, batch_stats = variables["params"], variables["batch_stats"]
    r["params"] = models.count_params(params)

    r["fast_convs"], r["convs"] = _count_fast_convs(arch, num_classes, variables, x)

    fwd, grad, loss_fns = {}, {}, {}
    for name, model in convs.items():

        def loss_fn(p, b, model=model):
            logits, _ = model.apply(
                {"params": p, "batch_stats": batch_stats},
                b["image"],
                train=True,
                mutable=["batch_stats"],
            )
            return gj.cross_entropy_with_temperature(logits, b["label"], 200.0)

        loss_fns[name] = loss_fn
        apply = jax.jit(lambda v, im, model=model: model.apply(v, im, train=False))
        fwd[name], r[f"compile_fwd_{name}_s"] = _compile(apply, variables, x)
        grad[name], r[f"compile_grad_{name}_s"] = _compile(
            jax.jit(jax.value_and_grad(loss_fn)), params, data
        )
        r[f"peak_fwd_{name}_bytes"] = peak_bytes(fwd[name])
        r[f"peak_grad_{name}_bytes"] = peak_bytes(grad[name])
    log(f"  {arch}: compiled forward and gradient")

    times = _alternate(
        {
            "fwd_auto": lambda: fwd["auto"](variables, x),
            "fwd_native": lambda: fwd["native"](variables, x),
            "grad_auto": lambda: grad["auto"](params, data),
            "grad_native": lambda: grad["native"](params, data),
        },
        rounds,
    )
    for k, v in times.items():
        r[f"{k}_s"] = float(np.median(v))
    r["fwd_speedup"] = _paired_ratio(times["fwd_native"], times["fwd_auto"])
    r["grad_speedup"] = _paired_ratio(times["grad_native"], times["grad_auto"])
    log(
        f"  {arch}: gradient {r['grad_auto_s'] * 1e3:.0f} ms "
        f"(native {r['grad_native_s'] * 1e3:.0f} ms)"
    )

    # grasp_scores with the default convolution: the jitted program grasp_scores runs for one
    # chunk, compiled here so its compile time and memory can be read.
    grasp, r["compile_grasp_s"] = _compile(
        jax.jit(lambda p, d: gj.grasp_scores(p, loss_fns["auto"], d)), params, data
    )
    r["peak_grasp_bytes"] = peak_bytes(grasp)
    # What the work itself costs: an exact forward-over-reverse Hg doubles every bilinear op of
    # the gradient (the tangent of a·b is ta·b + a·tb), so FLOP-bound models sit near 3.
    r["grasp_flop_gradients"] = _ratio(flops(grasp), flops(grad["auto"]))
    # Check that the public call reuses that program (same loss_fn object): no compile here.
    jax.block_until_ready(gj.grasp_scores(params, loss_fns["auto"], data))
    times = _alternate(
        {
            "grasp": lambda: gj.grasp_scores(params, loss_fns["auto"], data),
            "grad": lambda: grad["auto"](params, data),
        },
        max(rounds // 2, 2),
    )
    r["grasp_s"] = float(np.median(times["grasp"]))
    r["grasp_gradients"] = _paired_ratio(times["grasp"], times["grad"])
    log(
        f"  {arch}: grasp_scores {r['grasp_s'] * 1e3:.0f} ms = {r['grasp_gradients']:.2f} gradients"
    )

    ts = train_step_bench.bench(
        arch,
        batch,
        pairs,
        sparsity,
        image_shape=shape,
        num_classes=num_classes,
        dataset=dataset,
        model=convs["auto"],
        variables=variables,
    )
    r.update(
        {
            "step_masked_s": ts["masked_step_s"],
            "step_plain_s": ts["plain_step_s"],
            "mask_overhead": ts["overhead"],
            "mask_select_fraction": ts["select_fraction"],
            "train_images_per_s": ts["images_per_s"],
            "compile_step_s": ts["compile_s"],
        }
    )
    log(
        f"  {arch}: train step {ts['masked_step_s'] * 1e3:.0f} ms masked, "
        f"{ts['plain_step_s'] * 1e3:.0f} ms plain ({ts['overhead']:+.1%})"
    )
    return r


def bench_pipeline(steps: int, batch: int) -> dict:
    data_dir = DEFAULT_DATA_DIR
    dataset = "cifar10" if os.path.isdir(os.path.join(data_dir, "cifar10")) else "digits"
    if dataset == "digits":
        data_dir = None
    common = {"data_dir": data_dir, "global_batch_size": batch}
    # Start-up (building the pipeline, filling the shuffle buffer) is the first 5 batches.
    ips = pipeline_images_per_second(dataset, skip_steps=5, num_steps=steps, **common)
    return {"dataset": dataset, "batch": batch, "steps": steps, "images_per_s": ips}


def _ms(s: float | None) -> str:
    return "n/a" if s is None else (f"{s * 1e3:,.1f}" if s < 0.1 else f"{s * 1e3:,.0f}")


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def _mark(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render(results: list[dict], pipeline: dict | None, meta: dict) -> str:
    out = [
        "# Performance",
        "",
        (
            "Written by `python -m benchmarks.run` ("
            + " ".join(meta["argv"])
            + "); do not edit the "
            "tables by hand, rerun it."
        ),
        "",
        (
            f"- backend: **{meta['backend']}**, device: {meta['device']} x {meta['device_count']}, "
            f"host: {meta['cpus']} CPU cores ({meta['machine']})"
        ),
        (
            f"- jax {meta['jax']}, jaxlib {meta['jaxlib']}, flax {meta['flax']}, "
            f"Python {meta['python']}"
        ),
        f"- date: {meta['date']}; float32; total run {meta['total_s'] / 60:.1f} min",
        (
            f"- {meta['rounds']} alternating rounds per timing (medians), "
            f"{meta['pairs']} train-step pairs"
        ),
        "",
        (
            "Times are medians in ms. *auto* is the models' default convolution "
            "(`grasp_jax.models.Conv`: `grasp_jax.models.conv.conv_general_dilated`, "
            "`GRASP_JAX_FAST_CONV=auto`: the patches "
            "fast path where XLA:CPU is slow, native elsewhere and on every GPU/TPU); *native* is "
            "`grasp_jax.models.NativeConv`, `lax.conv_general_dilated` in every conv. "
            "Speed-ups are "
            "medians of per-round ratios "
            "(native / auto), measured alternately in one process on a shared machine. "
            "*fast convs*: "
            "how many of the network's convolutions the default runs as matmuls (where it is 0 the "
            "two programs are the same and their ratio shows only the noise; 1x1 convs count as "
            "fast: auto mode computes their values natively and their derivatives as matmuls)."
        ),
        "",
        "## Speed",
        "",
        (
            "| model | input | batch | fast convs | forward auto | forward native | speed-up "
            "| value_and_grad auto "
            "| value_and_grad native | speed-up | grasp_scores | = gradients "
            "| XLA FLOPs = gradients "
            "| train step masked "
            "| train step plain | mask overhead | train images/s |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        out.append(
            f"| {r['arch']} | {r['input']} | {r['batch']} | {r['fast_convs']}/{r['convs']} | "
            f"{_ms(r['fwd_auto_s'])} | "
            f"{_ms(r['fwd_native_s'])} | {r['fwd_speedup']:.2f}x | {_ms(r['grad_auto_s'])} | "
            f"{_ms(r['grad_native_s'])} | {r['grad_speedup']:.2f}x | {_ms(r['grasp_s'])} | "
            f"{r['grasp_gradients']:.2f} | {_fmt_ratio(r.get('grasp_flop_gradients'))} | "
            f"{_ms(r['step_masked_s'])} | {_ms(r['step_plain_s'])} | "
            f"{r['mask_overhead']:+.1%} | {r['train_images_per_s']:,.1f} |"
        )
    out += [
        "",
        "## Compile time and memory",
        "",
        (
            "Compile times in seconds (the initializers' in *init*); peak memory in MiB is XLA's "
            "`memory_analysis()` of the compiled program: arguments + outputs + temporaries - "
            "aliased."
        ),
        "",
        (
            "| model | params | init | compile forward auto / native "
            "| compile gradient auto / native "
            "| compile grasp_scores | compile train step | peak forward auto / native "
            "| peak gradient auto / native | peak grasp_scores |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        out.append(
            f"| {r['arch']} | {r['params']:,} | {r['init_s']:.1f} | "
            f"{r['compile_fwd_auto_s']:.1f} / {r['compile_fwd_native_s']:.1f} | "
            f"{r['compile_grad_auto_s']:.1f} / {r['compile_grad_native_s']:.1f} | "
            f"{r['compile_grasp_s']:.1f} | {r['compile_step_s']:.1f} | "
            f"{_mib(r['peak_fwd_auto_bytes'])} / {_mib(r['peak_fwd_native_bytes'])} | "
            f"{_mib(r['peak_grad_auto_bytes'])} / {_mib(r['peak_grad_native_bytes'])} | "
            f"{_mib(r['peak_grasp_bytes'])} |"
        )
    if pipeline is not None:
        out += [
            "",
            "## Input pipeline",
            "",
            (
                f"`{pipeline['dataset']}` training stream (decode, augment, batch on the host), "
                f"batch {pipeline['batch']}, {pipeline['steps']} "
                f"batches after 5 start-up batches: **{pipeline['images_per_s']:,.0f} images/s**."
            ),
        ]
    out += ["", "## Targets", ""]
    by = {r["arch"]: r for r in results}
    if "vgg19" in by:
        r = by["vgg19"]
        note = "" if r["batch"] == 64 else f" (measured at batch {r['batch']}, the target is at 64)"
        out.append(
            f"- VGG19 (CIFAR) gradient >= {TARGETS['vgg19_speedup']}x faster than plain XLA "
            f"conv: {r['grad_speedup']:.2f}x, "
            f"{_mark(r['grad_speedup'] >= TARGETS['vgg19_speedup'])}{note}."
        )
    paper = [r for r in results if r["arch"] in PAPER_MODELS]
    if paper:
        worst = max(paper, key=lambda r: r["grasp_gradients"])
        out.append(
            f"- grasp_scores <= {TARGETS['grasp_gradients']} gradients for every paper model: "
            "worst "
            + f"{worst['arch']} {worst['grasp_gradients']:.2f}, "
            + _mark(worst["grasp_gradients"] <= TARGETS["grasp_gradients"])
            + " ("
            + ", ".join(f"{r['arch']} {r['grasp_gradients']:.2f}" for r in paper)
            + "); "
            "XLA counts "
            + ", ".join(f"{r['arch']} {_fmt_ratio(r.get('grasp_flop_gradients'))}" for r in paper)
            + " gradients of FLOPs in the same programs."
        )
    if results:
        worst = max(results, key=lambda r: r["mask_overhead"])
        out.append(
            f"- masked train step within {TARGETS['mask_overhead']:.0%} of unmasked: worst "
            f"{worst['arch']} {worst['mask_overhead']:+.1%}, "
            + _mark(worst["mask_overhead"] <= TARGETS["mask_overhead"])
            + " ("
            + ", ".join(f"{r['arch']} {r['mask_overhead']:+.1%}" for r in results)
            + "; the masking alone is "
            + ", ".join(f"{r['mask_select_fraction']:.1%}" for r in results)
            + " of a plain step)."
        )
        changed = [r for r in results if r["fast_convs"]]
        same = [r["arch"] for r in results if not r["fast_convs"]]
        if changed:
            slowest = min(changed, key=lambda r: r["grad_speedup"])
            out.append(
                f"- no model's gradient slower with the default convolution: lowest speed-up "
                f"{slowest['arch']} {slowest['grad_speedup']:.2f}x, "
                + _mark(slowest["grad_speedup"] >= 0.95)
                + " (within 5% counts as equal"
                + (
                    f"; {', '.join(same)} run no conv on the fast path, so both programs are the "
                    "same"
                    if same
                    else ""
                )
                + ")."
            )
    return "\n".join(out) + "\n"


def _write(text: str, path: str) -> None:
    """Prints the report and writes it to ``path``, keeping the notes below NOTES_MARKER."""
    print()
    print(text)
    if not path:
        return
    out = Path(path)
    notes = f"\n{NOTES_MARKER}\n"
    if out.exists() and NOTES_MARKER in out.read_text():
        notes = "\n" + NOTES_MARKER + out.read_text().split(NOTES_MARKER, 1)[1]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + notes)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=tuple(MODELS))
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch for the CIFAR models (default 64; resnet50 uses --resnet50_batch)",
    )
    p.add_argument("--resnet50_batch", type=int, default=None, help="default 8")
    p.add_argument("--rounds", type=int, default=None, help="alternating timing rounds (default 3)")
    p.add_argument("--pairs", type=int, default=None, help="train-step pairs (default 6)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument(
        "--pipeline_steps",
        type=int,
        default=None,
        help="input-pipeline batches timed (default 100; 0 skips)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 rounds, 3 pairs, batch 32 (resnet50: 4), 30 pipeline batches",
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help="Markdown report path ('' to skip)")
    p.add_argument("--json", default="", help="also write the raw figures here")
    p.add_argument("--from_json", default="", help="only re-render a --json file's figures")
    jax_cache.add_flag(p, default=jax_cache.DISABLED)
    args = p.parse_args(argv)
    jax_cache.enable(args.compilation_cache)
    if args.from_json:
        d = json.loads(Path(args.from_json).read_text())
        _write(render(d["models"], d["pipeline"], d["meta"]), args.out)
        return d["models"]
    q = args.quick
    batch = args.batch or (32 if q else 64)
    r50_batch = args.resnet50_batch or (4 if q else 8)
    rounds = args.rounds or (2 if q else 3)
    pairs = args.pairs or (3 if q else 6)
    pipeline_steps = args.pipeline_steps if args.pipeline_steps is not None else (30 if q else 100)

    start = time.perf_counter()
    dev = jax.devices()[0]
    print(
        f"{jax.default_backend()} ({dev.device_kind} x {jax.local_device_count()}), jax "
        f"{jax.__version__}, "
        f"{conv_lib.FAST_CONV_ENV}={os.environ.get(conv_lib.FAST_CONV_ENV, 'auto')}",
        flush=True,
    )
    log = functools.partial(print, flush=True)
    results, failed = [], []
    for arch in args.models:
        b = r50_batch if arch == "resnet50" else batch
        log(f"{arch}, batch {b}:")
        try:
            results.append(bench_model(arch, b, rounds, pairs, args.sparsity, log=log))
        except Exception as e:  # noqa: BLE001 -- report the others rather than lose a long run
            log(f"  {arch} FAILED: {type(e).__name__}: {e}")
            failed.append(f"{arch}: {type(e).__name__}: {str(e)[:200]}")
    pipeline = None
    if pipeline_steps:
        pipeline = bench_pipeline(pipeline_steps, 128)
        log(f"input pipeline ({pipeline['dataset']}): {pipeline['images_per_s']:,.0f} images/s")

    import jaxlib

    meta = {
        "argv": ["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])],
        "backend": jax.default_backend(),
        "device": dev.device_kind,
        "device_count": jax.local_device_count(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "rounds": rounds,
        "pairs": pairs,
        "total_s": time.perf_counter() - start,
    }
    text = render(results, pipeline, meta)
    if failed:
        text += "\n## Failed\n\n" + "\n".join(f"- {f}" for f in failed) + "\n"
    _write(text, args.out)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"meta": meta, "models": results, "pipeline": pipeline}, indent=1)
        )
    return results


if __name__ == "__main__":
    main()
