"""What :func:`kronfact.compress` did: one :class:`LayerReport` per replaced layer, the totals, a rich
table (``print(report)``) and plain JSON (``report.to_dict()``, saved by ``kronfact compress`` as
compression_report.json).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class LayerReport:
    """One replaced layer. ``shape`` is (out_features, in_features); params count weight and bias."""

    name: str
    shape: tuple[int, int]
    shape_a: tuple[int, int]
    shape_b: tuple[int, int]
    rank: int
    init: str
    params_before: int
    params_after: int
    rel_error: float  # ‖W − Σ a_i ⊗ b_i‖_F / ‖W‖_F
    orientation: str = "linear"
    aliases: tuple[str, ...] = ()


@dataclass
class CompressionReport:
    """What :func:`compress` did: the replaced layers, the selected layers the solver kept dense, and
    the model's parameter count (:func:`kronfact.modules.count_parameters`) before and after."""

    layers: list[LayerReport]
    params_before: int
    params_after: int
    kept_dense: list[str] = field(default_factory=list)
    budget: int | None = None

    @property
    def ratio(self) -> float:
        """params_after / params_before."""
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (tuples as lists)."""
        layers = [{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(r).items()} for r in self.layers]
        return {"layers": layers, "kept_dense": list(self.kept_dense), "params_before": self.params_before,
                "params_after": self.params_after, "ratio": self.ratio, "budget": self.budget}

    def __rich__(self) -> Table:
        budget = "" if self.budget is None else f" (budget {self.budget:,})"
        unchanged = not self.layers and self.budget is not None and self.budget >= self.params_before
        table = Table(title="kronfact compression", caption=(
            f"model: {self.params_before:,} → {self.params_after:,} parameters = {self.ratio:.1%}{budget}"
            + ("; nothing replaced: the budget is the model's size or more" if unchanged else
               f"; kept dense: {', '.join(self.kept_dense)}" if self.kept_dense else "")))
        for col in ("layer", "shape", "A", "B", "rank", "init", "params", "kept", "rel. error"):
            table.add_column(col, justify="left" if col in ("layer", "init") else "right")
        for r in self.layers:
            table.add_row(r.name, "×".join(map(str, r.shape)), "×".join(map(str, r.shape_a)),
                          "×".join(map(str, r.shape_b)), str(r.rank), r.init,
                          f"{r.params_before:,} → {r.params_after:,}", f"{r.params_after / r.params_before:.1%}",
                          f"{r.rel_error:.4f}")
        return table

    def __str__(self) -> str:
        console = Console(file=io.StringIO(), width=160, color_system=None)
        console.print(self)
        return console.file.getvalue()
