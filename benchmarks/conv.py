"""Native XLA convolution vs the patches fast path of ``grasp_jax.models.conv``.

Prints, per convolution shape, the forward time and the ``value_and_grad``
time (gradient w.r.t. input and kernel, as in training) of
``lax.conv_general_dilated`` and of the fast path, and what ``mode='auto'``
picks on this backend.  Each time is the minimum over ``--repeats`` runs after
compilation, native and fast interleaved, so that load from other processes
on a shared machine inflates both alike.

  python -m benchmarks.conv                  # VGG19-on-CIFAR shapes, batch 64
  python -m benchmarks.conv --hvp            # add Hessian-vector products
  python -m benchmarks.conv --sweep          # the grid behind fast_path_wins
  python -m benchmarks.conv --resnet         # 1x1 and strided convs
  python -m benchmarks.conv --network        # a whole VGG19 value_and_grad
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from grasp_jax.models.conv import conv_general_dilated, uses_fast_path

from experiments import jax_cache

_DN = ("NHWC", "HWIO", "NHWC")

# (spatial size, in channels, out channels, kernel size) of VGG19's convs on
# 32x32 CIFAR inputs; every shape appears 1-4 times in the network.
VGG19_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (32, 3, 64, 3),
    (32, 64, 64, 3),
    (16, 128, 128, 3),
    (8, 256, 256, 3),
    (4, 512, 512, 3),
    (2, 512, 512, 3),
)


# (size, in, out, kernel, stride): ResNet downsampling convs and bottleneck
# 1x1 convs (CIFAR ResNet-32/56 widths 16-64, ResNet-50 widths 64-2048).
RESNET_SHAPES: tuple[tuple[int, int, int, int, int], ...] = (
    (32, 16, 32, 3, 2),
    (16, 32, 64, 3, 2),
    (32, 16, 32, 1, 2),
    (16, 32, 64, 1, 2),
    (16, 64, 256, 1, 1),
    (16, 256, 64, 1, 1),
    (8, 512, 128, 1, 1),
    (8, 256, 512, 1, 2),
    (4, 1024, 256, 1, 1),
    (2, 512, 2048, 1, 1),
    (4, 1024, 2048, 1, 2),
    (2, 512, 512, 3, 1),
)


def _min_time(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls (compiled beforehand)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def _programs(mode: str, hvp: bool, stride: int = 1) -> dict[str, Callable[..., Any]]:
    conv = functools.partial(
        conv_general_dilated,
        window_strides=(stride, stride),
        padding="SAME",
        dimension_numbers=_DN,
        mode=mode,
    )

    def loss(x: jax.Array, k: jax.Array) -> jax.Array:
        return jnp.sum(conv(x, k) ** 2)

    progs = {
        "fwd": jax.jit(lambda x, k: conv(x, k)),
        "vg": jax.jit(jax.value_and_grad(loss, argnums=(0, 1))),
    }
    if hvp:
        # Forward-over-reverse, as grasp_scores computes H·v.
        progs["hvp"] = jax.jit(
            lambda x, k: jax.jvp(jax.grad(loss, argnums=(0, 1)), (x, k), (x, k))[1]
        )
    return progs


def time_shape(
    batch: int,
    size: int,
    cin: int,
    cout: int,
    ksize: int,
    stride: int = 1,
    *,
    repeats: int,
    hvp: bool = False,
) -> dict[str, float]:
    """Seconds for native vs fast, keys like 'fwd_native', 'vg_fast'.

    Also 'rel_err': max |fast - native| / max |native| of the forward output.
    """
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (batch, size, size, cin), jnp.float32)
    k = jax.random.normal(kk, (ksize, ksize, cin, cout), jnp.float32) * 0.05
    progs = {m: _programs(m, hvp, stride) for m in ("native", "fast")}
    for by_mode in progs.values():
        for fn in by_mode.values():
            jax.block_until_ready(fn(x, k))  # compile, warm up
    best: dict[str, float] = {}
    # Agreement in float32, relative to the output's scale.
    y_native, y_fast = progs["native"]["fwd"](x, k), progs["fast"]["fwd"](x, k)
    best["rel_err"] = float(jnp.max(jnp.abs(y_fast - y_native)) / jnp.max(jnp.abs(y_native)))
    for _ in range(repeats):  # interleave so load hits both alike
        for mode, by_mode in progs.items():
            for name, fn in by_mode.items():
                key = f"{name}_{mode}"
                best[key] = min(best.get(key, float("inf")), _min_time(fn, x, k, repeats=1))
    return best


def _auto_decision(batch: int, size: int, cin: int, cout: int, ksize: int, stride: int = 1) -> bool:
    x = jax.ShapeDtypeStruct((batch, size, size, cin), jnp.float32)
    k = jax.ShapeDtypeStruct((ksize, ksize, cin, cout), jnp.float32)
    return uses_fast_path(x, k, (stride, stride), "SAME", dimension_numbers=_DN, mode="auto")


def table(shapes: Sequence[tuple[int, ...]], *, repeats: int, hvp: bool, max_gflop: float) -> None:
    """Prints one row per (batch, size, cin, cout, ksize[, stride]) shape."""
    cols = ["fwd", "vg"] + (["hvp"] if hvp else [])
    head = (
        f"{'batch':>5} {'shape':>22} {'GFLOP':>6} "
        + " ".join(f"{c + ' nat':>9} {c + ' fast':>9} {'x':>5}" for c in cols)
        + f" {'rel err':>7} {'winner':>6} {'auto':>6}"
    )
    print(f"backend: {jax.default_backend()}, times in ms (min of {repeats})")
    print(head)
    for batch, size, cin, cout, ksize, *rest in shapes:
        stride = rest[0] if rest else 1
        out_size = -(-size // stride)
        gflop = 2 * batch * out_size**2 * ksize * ksize * cin * cout / 1e9
        if gflop > max_gflop:
            continue
        t = time_shape(batch, size, cin, cout, ksize, stride, repeats=repeats, hvp=hvp)
        cells = []
        for c in cols:
            nat, fast = t[f"{c}_native"] * 1e3, t[f"{c}_fast"] * 1e3
            cells.append(f"{nat:9.2f} {fast:9.2f} {nat / fast:5.1f}")
        # Training runs value_and_grad, so it decides who wins.
        winner = "fast" if t["vg_fast"] < t["vg_native"] else "native"
        auto = "fast" if _auto_decision(batch, size, cin, cout, ksize, stride) else "native"
        shape = f"{ksize}x{ksize} {cin}->{cout} @{size}x{size}"
        shape += f" /{stride}" if stride != 1 else ""
        flag = "" if winner == auto else "  <- auto differs"
        print(
            f"{batch:5d} {shape:>22} {gflop:6.2f} "
            + " ".join(cells)
            + f" {t['rel_err']:7.1e} {winner:>6} {auto:>6}{flag}",
            flush=True,
        )


def network(batch: int, repeats: int, hvp: bool = False) -> None:
    """value_and_grad (and H·v) of a BatchNorm-free CIFAR VGG19, each mode."""
    import flax.linen as nn
    import optax

    cfg = (
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
    )

    class VGG19(nn.Module):
        mode: str

        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            conv_fn = functools.partial(conv_general_dilated, mode=self.mode)
            for v in cfg:
                if v == "M":
                    x = nn.max_pool(x, (2, 2), (2, 2))
                else:
                    x = nn.relu(nn.Conv(v, (3, 3), conv_general_dilated=conv_fn)(x))
            x = jnp.mean(x, axis=(1, 2))
            return nn.Dense(10)(x)

    x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
    y = jnp.arange(batch) % 10
    params = VGG19("native").init(jax.random.key(1), x)
    print(f"VGG19, batch {batch}, backend {jax.default_backend()}, seconds (min of {repeats}):")
    fns = {}
    for mode in ("native", "auto"):
        model = VGG19(mode)

        def loss(p: Any, model: nn.Module = model) -> jax.Array:
            logits = model.apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        fns["value_and_grad", mode] = jax.jit(jax.value_and_grad(loss))
        if hvp:
            fns["hvp", mode] = jax.jit(lambda p, loss=loss: jax.jvp(jax.grad(loss), (p,), (p,))[1])
    for fn in fns.values():
        jax.block_until_ready(fn(params))
    best = {key: float("inf") for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            best[key] = min(best[key], _min_time(fn, params, repeats=1))
    for (what, mode), t in best.items():
        print(f"  {what:>14} {mode:>6}: {t:.3f} s")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hvp", action="store_true", help="also time forward-over-reverse HVPs")
    parser.add_argument(
        "--sweep", action="store_true", help="sizes 1..32 x channels 3..512 x kernels 1, 3"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16, 32])
    parser.add_argument("--channels", type=int, nargs="+", default=[3, 16, 64, 128, 256, 512])
    parser.add_argument("--kernels", type=int, nargs="+", default=[1, 3])
    parser.add_argument(
        "--max-gflop", type=float, default=25.0, help="skip shapes whose forward needs more GFLOP"
    )
    parser.add_argument(
        "--resnet", action="store_true", help="ResNet shapes: 1x1 (strided) and strided 3x3"
    )
    parser.add_argument(
        "--network", action="store_true", help="time a whole VGG19 value_and_grad instead"
    )
    jax_cache.add_flag(parser)
    args = parser.parse_args(argv)
    jax_cache.enable(args.compilation_cache)
    if args.network:
        for b in args.batch:
            network(b, args.repeats, args.hvp)
        return
    if args.resnet:
        shapes = [(b, *s) for b in args.batch for s in RESNET_SHAPES]
    elif args.sweep:
        shapes = [
            (b, s, c, c, k)
            for b in args.batch
            for k in args.kernels
            for s in args.sizes
            for c in args.channels
        ]
    else:
        shapes = [(b, s, ci, co, k) for b in args.batch for s, ci, co, k in VGG19_SHAPES]
    table(shapes, repeats=args.repeats, hvp=args.hvp, max_gflop=args.max_gflop)


if __name__ == "__main__":
    main()
