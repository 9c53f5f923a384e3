"""grasp_jax beside PyTorch in one process: the training gradient and GraSP, first call and steady.

    pip install -e '.[benchmarks]'          # PyTorch (CPU) for this script only
    python -m benchmarks.vs_pytorch                        # ResNet-32 and VGG19, ~10 min loaded
    python -m benchmarks.vs_pytorch --archs vgg19 --rounds 3 --skip_grasp
    python -m benchmarks.vs_pytorch --write docs/PERFORMANCE.md   # also replace its section

For each network the Flax model (``grasp_jax.models``, its default convolution) and its PyTorch
twin (``benchmarks.torch_reference``) hold the same initial weights; the twin's logits are
checked against the Flax ones first. Then, alternating the two frameworks round by round so that
the load of a shared machine hits both alike:

* **training gradient**: ``jax.jit(jax.value_and_grad(loss))`` vs ``torch.autograd.grad`` of the
  mean cross-entropy, BatchNorm in training mode (ResNet-32 at batch 128, VGG19 at 64);
* **GraSP** at the CIFAR-10 preset (100 images, two halves of 50, T = 200):
  ``grasp_jax.grasp_scores(..., num_microbatches=2)`` vs the authors' double-backprop algorithm
  (``torch_reference.grasp_scores``). *first call* is the first call in the process (JAX's
  compilation included; the persistent compilation cache is switched off unless
  ``--compilation_cache DIR`` names one: run twice with the same DIR, and the second run's
  first calls are warm); *steady* the median of later calls.

Ratios are grasp_jax / PyTorch, medians of per-round ratios; only ratios measured in one run are
comparable across machines.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import grasp_jax as gj
from grasp_jax import models

from benchmarks import sections
from experiments import jax_cache

# arch -> training batch (the paper's CIFAR-10 batch sizes)
ARCHS = {"resnet32": 128, "vgg19": 64}
TARGETS = {"resnet32": 3.0, "vgg19": 1.5}  # training-gradient time over PyTorch's, at most
SCORING_IMAGES, TEMPERATURE = 100, 200.0


def _timed(fn: Callable[[], Any]) -> float:
    """Wall time of ``fn()``; JAX callables block on their result themselves."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _alternate(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(_timed(fn))
    return times


def _twins(arch: str, batch: int):
    """(Flax model, its variables, the PyTorch twin with the same weights, data)."""
    import torch

    from benchmarks import torch_reference as ref

    model = models.get_model(arch, 10)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(max(batch, SCORING_IMAGES), 32, 32, 3)).astype(np.float32)
    y = (np.arange(len(x)) % 10).astype(np.int32)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(x[:2]))
    twin = ref.ResNet(32) if arch == "resnet32" else ref.VGG(models.CIFAR_CFGS[19])
    ref.load_flax_params(twin, variables["params"])
    twin.train()
    data = {"x": x, "y": y, "tx": torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
            "ty": torch.from_numpy(y.astype(np.int64))}
    return model, variables, twin, data


def training_mode_loss(model, batch_stats, temperature: float = 1.0):
    """Mean cross-entropy of ``model`` with BatchNorm in training mode (its state held fixed)."""
    def loss_fn(params, batch):
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                train=True, mutable=["batch_stats"])
        return gj.cross_entropy_with_temperature(logits, batch["label"], temperature)
    return loss_fn


def check_same_network(model, variables, twin, data, n: int = 8) -> float:
    """Relative difference of the two frameworks' training-mode logits on ``n`` images."""
    import torch

    ours, _ = model.apply(variables, jnp.asarray(data["x"][:n]), train=True,
                          mutable=["batch_stats"])
    with torch.no_grad():
        theirs = twin(data["tx"][:n]).numpy()
    return float(np.linalg.norm(np.asarray(ours) - theirs) / np.linalg.norm(theirs))


def bench_gradient(arch: str, rounds: int, twins) -> dict[str, float]:
    from benchmarks import torch_reference as ref

    model, variables, twin, data = twins
    batch = ARCHS[arch]
    jbatch = {"image": jnp.asarray(data["x"][:batch]), "label": jnp.asarray(data["y"][:batch])}
    grad = jax.jit(jax.value_and_grad(training_mode_loss(model, variables["batch_stats"])))
    t = time.perf_counter()
    jax.block_until_ready(grad(variables["params"], jbatch))
    first_s = time.perf_counter() - t
    tx, ty = data["tx"][:batch], data["ty"][:batch]
    ref.training_gradient(twin, tx, ty)  # warm
    times = _alternate({
        "jax": lambda: jax.block_until_ready(grad(variables["params"], jbatch)),
        "torch": lambda: ref.training_gradient(twin, tx, ty),
    }, rounds)
    return _summary(times) | {"jax_first_s": first_s}


def bench_grasp(arch: str, rounds: int, twins) -> dict[str, float]:
    from benchmarks import torch_reference as ref

    model, variables, twin, data = twins
    n = SCORING_IMAGES
    jbatch = {"image": jnp.asarray(data["x"][:n]), "label": jnp.asarray(data["y"][:n])}
    loss_fn = training_mode_loss(model, variables["batch_stats"], TEMPERATURE)
    ours = lambda: jax.block_until_ready(
        gj.grasp_scores(variables["params"], loss_fn, jbatch, num_microbatches=2))
    theirs = lambda: ref.grasp_scores(twin, data["tx"][:n], data["ty"][:n], TEMPERATURE)
    first = {"jax_first_s": _timed(ours), "torch_first_s": _timed(theirs)}
    return _summary(_alternate({"jax": ours, "torch": theirs}, rounds)) | first


def _summary(times: dict[str, list[float]]) -> dict[str, float]:
    ratios = np.asarray(times["jax"]) / np.asarray(times["torch"])
    return {"jax_s": float(np.median(times["jax"])), "torch_s": float(np.median(times["torch"])),
            "ratio": float(np.median(ratios))}


def _machine() -> str:
    import torch

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{os.cpu_count()} CPU cores, load average {load} (1/5/15 min); jax "
            f"{jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads, OMP_WAIT_POLICY="
            f"{os.environ.get('OMP_WAIT_POLICY', '')!r}); "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
            f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")


def render(results: dict[str, dict], start: str, end: str, argv: list[str],
           cached: bool = False) -> str:
    lines = [f"`python -m benchmarks.vs_pytorch {' '.join(argv)}`".replace(" `", "`"),
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"- at start: {start}", f"- at end: {end}", "",
             "| what | grasp_jax | PyTorch | ratio | target |", "|---|---:|---:|---:|---:|"]
    for arch, r in results.items():
        g = r["gradient"]
        lines.append(f"| training gradient, {arch}, batch {ARCHS[arch]} (logits agree to "
                     f"{r['logits_rel_diff']:.0e}) | {g['jax_s']:.2f} s | {g['torch_s']:.2f} s | "
                     f"{g['ratio']:.2f}x | <= {TARGETS[arch]}x |")
        lines.append(f"| first gradient call, {arch} (compile included) | "
                     f"{g['jax_first_s']:.1f} s | | | |")
        if "grasp" in r:
            q = r["grasp"]
            # Target: a first call at most 1.5x the authors' with no cache, no slower warm.
            which, target = ("with the compilation cache", 1.0) if cached else ("no cache", 1.5)
            lines.append(f"| GraSP, {arch}, CIFAR-10 preset, first call ({which}) | "
                         f"{q['jax_first_s']:.1f} s | {q['torch_first_s']:.1f} s | "
                         f"{q['jax_first_s'] / q['torch_first_s']:.2f}x | <= {target}x |")
            lines.append(f"| GraSP, {arch}, steady state | {q['jax_s']:.1f} s | "
                         f"{q['torch_s']:.1f} s | {q['ratio']:.2f}x | <= 1.0x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    p.add_argument("--skip_grasp", action="store_true", help="only the training gradient")
    jax_cache.add_flag(p, default=jax_cache.DISABLED)
    p.add_argument("--omp_wait_policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", ""],
                   help="PyTorch's OpenMP threads: PASSIVE sleeps when idle (ACTIVE spin-waits, "
                   "which a loaded machine punishes: 4x slower ResNet-32 gradients measured); "
                   "'' leaves the environment as it is")
    p.add_argument("--write", type=Path, help="replace this file's vs_pytorch section")
    args = p.parse_args(argv)
    if args.omp_wait_policy:  # read once, when torch first starts its OpenMP runtime
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit("PyTorch is not installed: pip install -e '.[benchmarks]'") from None
    cached = jax_cache.enable(args.compilation_cache) is not None
    start, results = _machine(), {}
    for arch in args.archs:
        twins = _twins(arch, ARCHS[arch])
        r = results[arch] = {"logits_rel_diff": check_same_network(*twins)}
        if not args.skip_grasp:  # first: its first call is the process's first GraSP compile
            r["grasp"] = bench_grasp(arch, args.rounds, twins)
        r["gradient"] = bench_gradient(arch, args.rounds, twins)
        print(arch, r, flush=True)
    text = render(results, start, _machine(), argv or [], cached)
    print(text)
    if args.write:
        sections.replace_section(args.write, "vs_pytorch_cached" if cached else "vs_pytorch", text)
    return text


if __name__ == "__main__":
    main()
