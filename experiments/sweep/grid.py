"""The grid: its cells, their directory names and their runner command lines."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

NO_ABLATION = "none"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    method: str
    sparsity: float  # 0.0 for dense
    seed: int
    ablation: str = NO_ABLATION

    @property
    def name(self) -> str:
        """The cell's directory name; stable, so that a rerun finds the same workdir."""
        if self.method == "dense":
            return f"dense_seed{self.seed}"
        ablation = "" if self.ablation == NO_ABLATION else f"_{self.ablation}"
        # repr: the shortest text that reads back as the same float (":g" rounds 0.9999999 to 1).
        return f"{self.method}_s{self.sparsity!r}{ablation}_seed{self.seed}"

    @property
    def label(self) -> str:
        if self.method == "dense":
            return f"dense seed={self.seed}"
        text = f"{self.method} s={self.sparsity:g} seed={self.seed}"
        return text if self.ablation == NO_ABLATION else f"{text} ablation={self.ablation}"

    def runner_args(self, forwarded: Sequence[str], workdir: str) -> list[str]:
        """The runner's argv: forwarded flags first, so that the cell's own come last and win."""
        args = [*forwarded, "--method", self.method, "--seed", str(self.seed)]
        if self.method != "dense":
            args += ["--sparsity", repr(self.sparsity)]
        if self.ablation != NO_ABLATION:
            # "none" is never passed: the command of a plain cell stays what it was
            # before the runner had ablations, so such cells still resume.
            args += ["--ablation", self.ablation]
        return args + ["--workdir", workdir]


def make_grid(methods: Sequence[str], sparsities: Sequence[float], seeds: Sequence[int],
              ablations: Sequence[str]) -> list[Cell]:
    """Cells in run order: method, then sparsity, then ablation, then seed."""
    cells: list[Cell] = []
    for method in methods:
        if method == "dense":
            # Nothing is pruned, so neither sparsity nor an ablation applies.
            cells += [Cell("dense", 0.0, seed) for seed in seeds]
            continue
        cells += [Cell(method, s, seed, a) for s in sparsities for a in ablations for seed in seeds]
    return cells


def covering_cells(cells: Sequence[Cell]) -> list[Cell]:
    """A few of ``cells`` that hold every (method, ablation) pair, every seed and every
    sparsity at least once: what the runner must accept for the whole grid to run."""
    out: list[Cell] = []
    seen: set[tuple] = set()
    for cell in cells:
        facets = {("pair", cell.method, cell.ablation), ("seed", cell.seed)}
        if cell.method != "dense":
            facets.add(("sparsity", cell.sparsity))
        if not facets <= seen:
            seen |= facets
            out.append(cell)
    return out
