"""How glibc's allocator settings change XLA:CPU's speed: the training gradient and GraSP.

    python -m benchmarks.host_memory                      # ResNet-32 and VGG19, ~4 min quiet
    python -m benchmarks.host_memory --write docs/PERFORMANCE.md

XLA:CPU allocates the temporary buffers of one execution as one block (973 MB for ResNet-32's
gradient at batch 128, 2.0 GB for its GraSP at the CIFAR-10 preset). Blocks that large are
always ``mmap``-ed by glibc and unmapped when freed, so every execution faults its block in
again, 4 KiB at a time: one page fault per 4 KiB, every step. The allocator reads its settings
(``GLIBC_TUNABLES``) once, when a process starts, so each setting runs in a fresh process:

* ``default``: glibc as it comes;
* ``huge pages``: ``glibc.malloc.hugetlb=1`` asks for transparent huge pages on what malloc
  maps, so a block faults 2 MiB at a time (the kernel may compact memory for the first ones);
* ``one arena, no mmap``: every thread allocates from the main heap, nothing is mapped or
  given back, so the block is reused; fragmentation can grow the heap.

Each child times, for each network: GraSP at the CIFAR-10 preset (100 images, two halves,
T = 200; first call, compile included, then the median of ``--rounds`` calls) and the training
gradient (compiled ahead, then its first execution and the median of later ones), with the
page faults of one steady call and the process's peak resident memory. The persistent
compilation cache is off. Ratios compare a setting with ``default`` in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import sections

TUNABLES = {  # setting -> GLIBC_TUNABLES
    "default": "",
    "huge pages": "glibc.malloc.hugetlb=1",
    "one arena, no mmap": ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                           f"glibc.malloc.trim_threshold={1 << 40}"),
}
# Each name glibc also reads from the environment on its own, cleared so a setting is only its
# tunables.
_MALLOC_ENV = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_",
               "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _steady(fn, rounds: int) -> tuple[float, int]:
    """Median seconds and median page faults of ``rounds`` calls of ``fn``."""
    import numpy as np

    times, faults = [], []
    for _ in range(rounds):
        f, t = _faults(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        faults.append(_faults() - f)
    return float(np.median(times)), int(np.median(faults))


def _child(arch: str, batch: int, images: int, rounds: int) -> dict:
    """One network's figures, measured in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import grasp_jax as gj
    from grasp_jax import models

    from benchmarks import vs_pytorch
    from experiments import jax_cache

    jax_cache.enable(jax_cache.DISABLED)
    model = models.get_model(arch, 10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(max(batch, images), 32, 32, 3)).astype(np.float32))
    y = jnp.asarray(np.arange(len(x)) % 10, dtype=jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), x[:2])
    params, stats = variables["params"], variables["batch_stats"]
    out: dict = {"batch": batch, "images": images,  # and what glibc was told, to check
                 "malloc_env": {k: os.environ[k] for k in _MALLOC_ENV if k in os.environ}}

    loss = vs_pytorch.training_mode_loss(model, stats, vs_pytorch.TEMPERATURE)
    scoring = {"image": x[:images], "label": y[:images]}
    grasp = lambda: jax.block_until_ready(gj.grasp_scores(params, loss, scoring,
                                                          num_microbatches=2))
    t = time.perf_counter()
    grasp()
    out["grasp_first_s"] = time.perf_counter() - t
    out["grasp_s"], out["grasp_faults"] = _steady(grasp, rounds)

    training = {"image": x[:batch], "label": y[:batch]}
    compiled = jax.jit(jax.value_and_grad(vs_pytorch.training_mode_loss(model, stats))).lower(
        params, training).compile()
    gradient = lambda: jax.block_until_ready(compiled(params, training))
    t = time.perf_counter()
    gradient()
    out["gradient_first_s"] = time.perf_counter() - t
    out["gradient_s"], out["gradient_faults"] = _steady(gradient, rounds)
    out["temp_mb"] = compiled.memory_analysis().temp_size_in_bytes / 1e6
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    return out


def _run_child(setting: str, arch: str, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _MALLOC_ENV}
    if TUNABLES[setting]:
        env["GLIBC_TUNABLES"] = TUNABLES[setting]
    cmd = [sys.executable, "-m", "benchmarks.host_memory", "--child", "--archs", arch,
           "--batch", str(args.batch or _batch(arch)), "--images", str(args.images),
           "--rounds", str(args.rounds)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"the {setting!r} child for {arch} failed (exit {p.returncode}):\n"
                         f"{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _batch(arch: str) -> int:
    from benchmarks import vs_pytorch

    return vs_pytorch.ARCHS.get(arch, 64)


def _machine() -> str:
    def read(name: str) -> str:
        try:
            return Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text().strip()
        except OSError:
            return "n/a"

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    libc = " ".join(platform.libc_ver())
    return (f"{os.cpu_count()} CPU cores, load average {load} (1/5/15 min), {libc}, "
            f"transparent_hugepage enabled: {read('enabled')}, defrag: {read('defrag')}")


def render(results: dict[str, dict[str, dict]], argv: list[str], start: str, end: str) -> str:
    lines = [f"`python -m benchmarks.host_memory {' '.join(argv)}`".replace(" `", "`"),
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"- at start: {start}", f"- at end: {end}", "",
             "| network, what | setting | first call | steady | steady vs default "
             "| page faults per steady call | peak RSS |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for arch, by_setting in results.items():
        base = by_setting["default"]
        for what, label in (("grasp", f"GraSP, {base['images']} images in two halves"),
                            ("gradient", f"training gradient, batch {base['batch']}")):
            for setting, r in by_setting.items():
                lines.append(
                    f"| {arch}, {label} | {setting} | {r[what + '_first_s']:.2f} s | "
                    f"{r[what + '_s']:.2f} s | {r[what + '_s'] / base[what + '_s']:.2f}x | "
                    f"{r[what + '_faults']:,} | {r['peak_rss_gb']:.2f} GB |")
        lines.append(f"| {arch}: XLA temporary buffer of the gradient | | "
                     f"{base['temp_mb']:.0f} MB | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_memory",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["resnet32", "vgg19"])
    p.add_argument("--settings", nargs="+", default=list(TUNABLES), choices=list(TUNABLES))
    p.add_argument("--rounds", type=int, default=5, help="timed calls after the first")
    p.add_argument("--batch", type=int, default=None,
                   help="training batch (default: the paper's, 128 for ResNets, 64 for VGG)")
    p.add_argument("--images", type=int, default=100, help="GraSP's scoring images")
    p.add_argument("--write", type=Path, help="replace this file's host_memory section")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.archs[0], args.batch, args.images, args.rounds)))
        return ""
    if platform.libc_ver()[0] != "glibc":
        raise SystemExit(f"these settings are glibc's; this Python runs on "
                         f"{platform.libc_ver()[0] or 'another C library'}")
    if "default" not in args.settings:
        args.settings.insert(0, "default")  # the ratios' reference
    start, results = _machine(), {}
    for arch in args.archs:
        results[arch] = {}
        for setting in args.settings:
            results[arch][setting] = r = _run_child(setting, arch, args)
            print(arch, setting, r, flush=True)
    text = render(results, argv or [], start, _machine())
    print(text)
    if args.write:
        sections.replace_section(args.write, "host_memory", text)
    return text


if __name__ == "__main__":
    main()
