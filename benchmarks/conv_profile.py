"""Where a CIFAR training gradient spends its time on XLA:CPU, per convolution and per other op.

    python -m benchmarks.conv_profile                          # ResNet-32 (128) and VGG19 (64)
    python -m benchmarks.conv_profile --archs vgg19 --runs 5 --convs auto native
    python -m benchmarks.conv_profile --write docs/PERFORMANCE.md   # also replace its section

The program is the one training differentiates: ``value_and_grad`` of the cross-entropy of a
model in BatchNorm training mode, compiled once per convolution choice (``auto``: the models'
default ``grasp_jax.models.Conv``; ``native``: ``NativeConv``). Each run is recorded with
``jax.profiler.trace``; XLA:CPU records one event per thunk (an entry instruction of the
optimized HLO: a fusion, a convolution, a copy), named as in ``compiled.as_text()``. Each
instruction is attributed by its HLO metadata (``op_name``: the Flax module path and whether it
is in the forward pass ``jvp(...)`` or the backward pass ``transpose(jvp(...))``) to

* a convolution layer, as its forward, input gradient (dx) or kernel gradient (dk, the
  backward instruction whose output has the kernel's shape); on the fast path the patches'
  slicing and padding count with the layer's forward or dx;
* or another op, grouped by the kind of HLO instruction (its name without the number: e.g.
  ``transpose_copy_fusion``, the layout copies XLA inserts for kernel gradients) and the pass.

Times are medians over runs of the summed thunk times of one run (ms); the thunks of one run may
overlap on the two threads of XLA:CPU's pool, so they can add up to more than the wall time,
which is given beside them. Ratios between rows of one run are what carry over to another
machine, not the absolute figures.
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import grasp_jax as gj
from grasp_jax import models

from benchmarks import sections
from experiments import jax_cache

# arch -> batch: the paper's CIFAR-10 batch sizes for the two networks the CPU training targets
# are set for (benchmarks/vs_pytorch.py).
BATCHES = {"resnet32": 128, "vgg19": 64}
CONVS = {"auto": models.Conv, "native": models.NativeConv}

_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]\S* [\w-]+\(([^)]*)\)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclass
class Instruction:
    """One entry instruction of the optimized HLO: name, output shape, operands, metadata."""

    name: str
    shape: tuple[int, ...]
    operands: tuple[str, ...]
    op_name: str  # jit(f)/[transpose(]jvp(Model)[)]/layer1_0/conv1/<primitive>; "" if none

    @property
    def kind(self) -> str:
        return re.sub(r"\.\d+$", "", self.name)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def entry_instructions(hlo_text: str) -> dict[str, Instruction]:
    """Name -> instruction for every instruction of the ENTRY computation."""
    out, in_entry = {}, False
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY"):
            in_entry = True
        elif in_entry and line.startswith("}"):
            break
        elif in_entry and (m := _INSTR.match(line)):
            op = _OP_NAME.search(line)
            shape = tuple(int(d) for d in m.group(2).split(",") if d)
            operands = tuple(re.findall(r"%([\w.\-]+)", m.group(3)))
            out[m.group(1)] = Instruction(m.group(1), shape, operands, op.group(1) if op else "")
    return out


@dataclass(frozen=True)
class ConvLayer:
    path: str  # Flax module path, 'layer1_0/conv1'
    kernel: tuple[int, int, int, int]  # (kh, kw, in, out)
    size: int  # spatial size of its input

    @property
    def shape(self) -> str:
        kh, kw, cin, cout = self.kernel
        return f"{kh}x{kw} {cin}->{cout} at {self.size}x{self.size}"


def attribute(instructions: dict[str, Instruction], layers: list[ConvLayer],
              batch: int) -> dict[str, tuple[str, str]]:
    """Instruction name -> (group, role).

    Conv layers are grouped by shape, role ``fwd``, ``dx`` or ``dk``: found by the Flax path in
    the metadata; a backward instruction whose output has as many elements as the kernel is its
    dk. XLA:CPU's kernel-gradient convolutions carry no metadata: a fusion without it whose
    output has a kernel's dims is a dk, its input size read off the operands; their operands'
    layout copies (``transpose_copy_fusion`` without metadata) are role ``dk copies``. Every
    other instruction: (its HLO kind, its pass).
    """
    by_path = {layer.path: layer for layer in layers}
    out: dict[str, tuple[str, str]] = {}
    for name, ins in instructions.items():
        backward = "transpose(" in ins.op_name
        parts = ins.op_name.split("/")
        layer = next((by_path[p] for n in range(len(parts) - 1, 2, -1)
                      if (p := "/".join(parts[2:n])) in by_path), None)
        if layer is not None:
            is_dk = ins.size == math.prod(layer.kernel)
            out[name] = (layer.shape, "dk" if is_dk else "dx" if backward else "fwd")
        elif not ins.op_name and (layer := _unnamed_dk(ins, instructions, layers, batch)):
            out[name] = (layer.shape, "dk")
            for operand in ins.operands:
                if instructions[operand].kind == "transpose_copy_fusion":
                    out[operand] = (layer.shape, "dk copies")
        elif name not in out:
            out[name] = (ins.kind, "backward" if backward else "forward" if ins.op_name
                         else "no metadata")
    return out


def _unnamed_dk(ins: Instruction, instructions: dict[str, Instruction], layers: list[ConvLayer],
                batch: int) -> ConvLayer | None:
    """The layer whose kernel gradient ``ins`` is, judged by shapes, or None."""
    candidates = [la for la in layers if sorted(la.kernel) == sorted(ins.shape)]
    if not candidates or ins.kind not in ("ynn_fusion", "convolution"):
        return None
    # The input x (batch x size^2 x in) is one of the operands.
    sizes = {math.isqrt(instructions[o].size // (batch * la.kernel[2])) for o in ins.operands
             for la in candidates}
    return next((la for la in candidates if la.size in sizes), candidates[0])


def thunk_times(trace_dir: str, names: set[str]) -> dict[str, float]:
    """Seconds per HLO instruction name, summed over every event of one recorded trace."""
    (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in names:
                    totals[event.name] += event.duration_ns * 1e-9
    return totals


@dataclass
class Program:
    """A compiled gradient, what each of its instructions is, and their times in each run."""

    fn: Callable[[], Any]
    groups: dict[str, tuple[str, str]]  # instruction name -> (group, role), see attribute()
    layers: list[ConvLayer]
    compile_s: float
    runs: list[dict[tuple[str, str], float]] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)

    def record_run(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                t = time.perf_counter()
                jax.block_until_ready(self.fn())
                self.walls.append(time.perf_counter() - t)
            sums: dict[tuple[str, str], float] = collections.defaultdict(float)
            for name, seconds in thunk_times(d, set(self.groups)).items():
                sums[self.groups[name]] += seconds
            self.runs.append(sums)

    def medians(self) -> dict[tuple[str, str], float]:
        """(group, role) -> median over runs of the seconds it took in one run."""
        keys = set().union(*self.runs)
        return {k: float(np.median([r.get(k, 0.0) for r in self.runs])) for k in keys}


def conv_layers(model: nn.Module, params: Any, image_shape: tuple[int, ...]) -> list[ConvLayer]:
    """Every conv of ``model`` in forward order, with its kernel and input size (traced only)."""
    sizes: dict[str, int] = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
            sizes["/".join(context.module.path)] = args[0].shape[1]
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    kernels = {"/".join(p.key for p in path[:-1]): tuple(leaf.shape)
               for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if path[-1].key == "kernel" and leaf.ndim == 4}
    return [ConvLayer(path, kernels[path], size) for path, size in sizes.items()]


def gradient_program(arch: str, batch: int, conv: Any) -> Program:
    """The training gradient of ``arch`` with the convolution module type ``conv``, compiled."""
    model = models.get_model(arch, 10, conv=conv)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=(batch,)), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), x[:2])
    params = variables["params"]

    def loss_fn(params):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                train=True, mutable=["batch_stats"])
        return gj.cross_entropy_with_temperature(logits, y)

    t = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(params).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(params))  # warm
    layers = conv_layers(model, params, (32, 32, 3))
    groups = attribute(entry_instructions(compiled.as_text()), layers, batch)
    return Program(lambda: compiled(params), groups, layers, compile_s)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f}" if seconds >= 0.0095 else f"{seconds * 1e3:.1f}"


CONV_ROLES = ("fwd", "dx", "dk", "dk copies")


def render_arch(arch: str, batch: int, programs: dict[str, Program]) -> list[str]:
    """Markdown tables for one network: conv layers grouped by shape, then the other ops."""
    med = {c: p.medians() for c, p in programs.items()}
    layers = next(iter(programs.values())).layers
    shapes = collections.Counter(layer.shape for layer in layers)
    convs = list(programs)
    summary = ", ".join(
        f"{c}: wall {_ms(float(np.median(p.walls)))}, thunks {_ms(sum(med[c].values()))}, "
        f"compile {p.compile_s:.1f} s" for c, p in programs.items())
    head = " | ".join(f"{r} {c}" for c in convs for r in CONV_ROLES)
    out = [f"**{arch}, batch {batch}**: ms per run, summed over the layers of a shape ({summary})",
           "", f"| conv (kernel in->out at input) | layers | {head} |",
           "|---|---:|" + "---:|" * len(CONV_ROLES) * len(convs)]
    for shape, count in shapes.items():
        cells = [_ms(med[c].get((shape, r), 0.0)) for c in convs for r in CONV_ROLES]
        out.append(f"| {shape} | {count} | " + " | ".join(cells) + " |")
    out += ["", "| other op (HLO kind, pass) | " + " | ".join(convs) + " |",
            "|---|" + "---:|" * len(convs)]
    others = {k for c in convs for k in med[c] if k[0] not in shapes}
    for k in sorted(others, key=lambda k: -max(med[c].get(k, 0.0) for c in convs)):
        if max(med[c].get(k, 0.0) for c in convs) >= 1e-3:
            cells = " | ".join(_ms(med[c].get(k, 0.0)) for c in convs)
            out.append(f"| {k[0]} ({k[1]}) | {cells} |")
    return [*out, ""]


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=list(BATCHES), choices=list(BATCHES))
    p.add_argument("--convs", nargs="+", default=list(CONVS), choices=list(CONVS))
    p.add_argument("--runs", type=int, default=3, help="recorded runs per program (alternating)")
    p.add_argument("--write", type=Path, help="replace this file's conv_profile section")
    jax_cache.add_flag(p)
    args = p.parse_args(argv)
    jax_cache.enable(args.compilation_cache)
    lines = [f"({jax.default_backend()}, jax {jax.__version__}, {args.runs} alternating runs per "
             f"program, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", ""]
    for arch in args.archs:
        batch = BATCHES[arch]
        programs = {c: gradient_program(arch, batch, CONVS[c]) for c in args.convs}
        for _ in range(args.runs):
            for prog in programs.values():
                prog.record_run()
        lines += render_arch(arch, batch, programs)
        print("\n".join(lines), flush=True)
    text = "\n".join(lines)
    if args.write:
        sections.replace_section(args.write, "conv_profile", text)
    return text


if __name__ == "__main__":
    main()
