"""The runner-facing checks: every cell's command line must be one the runner accepts,
before the sweep writes anything.

Everything the sweep asks of the runner (its method and ablation names,
``experiments.run_config.parse_config`` with its checks: the runner's parser as a
library, not its CLI entry module) goes through
:func:`registry_names` and :func:`parse_cell_config`, so that a change of the
runner's interface is a change of those two functions only. Importing the runner loads JAX: nothing
here runs for ``--report_only``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from experiments import paths
from experiments.sweep.grid import NO_ABLATION, Cell, covering_cells

# Flags of the runner that the sweep sets per cell; users may not forward them.
OWNED_FLAGS = ("method", "sparsity", "seed", "workdir", "ablation", "overwrite")


class SweepUsageError(ValueError):
    """A sweep command line that cannot run; the CLI exits 2 with this message."""


def registry_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the runner's method names, its ablation names, "none" among them)."""
    from experiments import config_schema, methods

    return methods.names(), tuple(config_schema.ABLATIONS)


def parse_cell_config(argv: Sequence[str]) -> Any:
    """The runner's ``experiments.config_schema.Config`` for one cell's argv, with every check the
    runner makes before writing; ``SweepUsageError`` naming the problem otherwise."""
    from experiments import config_schema, run_config

    try:
        return run_config.parse_config(list(argv))
    except config_schema.UsageError as e:
        raise SweepUsageError(f"flags forwarded to experiments.run: {e}") from None


def owned_flag(forwarded: Sequence[str]) -> str | None:
    """The first forwarded flag that is one of OWNED_FLAGS (``--name`` or ``--name=value``),
    as ``--name``; None if none. (The runner takes no abbreviations: ``--over`` is refused
    by its parser, as an unknown flag.)"""
    for token in forwarded:
        name = token[2:].split("=", 1)[0] if token.startswith("--") else None
        if name in OWNED_FLAGS:
            return f"--{name}"
    return None


def check_names(cells: Sequence[Cell]) -> None:
    """Every method and ablation of the grid is the runner's; SweepUsageError otherwise."""
    methods, ablations = registry_names()
    for cell in cells:
        if cell.method not in methods:
            raise SweepUsageError(f"--methods: unknown method {cell.method!r}; valid: "
                                  + ", ".join(methods))
        if cell.ablation not in ablations:
            raise SweepUsageError(f"--ablations: unknown ablation {cell.ablation!r}; valid: "
                                  + ", ".join(a for a in ablations if a != NO_ABLATION)
                                  + f" (or {NO_ABLATION})")


def check_with_runner(cells: Sequence[Cell], forwarded: Sequence[str], sweep_dir: str,
                      cpu_only: bool = False) -> int:
    """Validate the forwarded flags and the grid with the runner's own parser and checks,
    before anything is written; return the steps a cell trains for.

    Every problem raises SweepUsageError with the runner's message. With
    ``cpu_only`` (the CLI) this process stays off any accelerator: it only
    parses, and a GPU backend here would hold memory its cells need for the
    whole sweep. The runner then checks --batch_size against the CPU's device
    count; each cell checks it again against the real devices.
    """
    flag = owned_flag(forwarded)
    if flag is not None:
        raise SweepUsageError(
            f"{flag} is set by the sweep for each cell; do not forward it (use --methods/"
            "--sparsities/--seeds/--ablations; remove a cell's directory to rerun it from scratch)")
    if cpu_only:
        import jax

        jax.config.update("jax_platforms", "cpu")  # before anything initializes a backend
    check_names(cells)
    num_steps = None
    for cell in covering_cells(cells):  # one of each method/ablation pair, seed and sparsity
        config = parse_cell_config(cell.runner_args(forwarded, paths.join(sweep_dir, cell.name)))
        num_steps = config.num_steps
    assert num_steps is not None  # the grid is never empty
    return num_steps
