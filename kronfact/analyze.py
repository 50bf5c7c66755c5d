"""How compressible is each weight: the Van Loan error of Kronecker sums over candidate factor shapes.

The engine of ``kronfact analyze`` (:mod:`kronfact.cli.analyze` parses and prints): for one weight
(out, in), :func:`analyze_shapes` picks a cheap grid of candidate A shapes and :func:`analyze_weight`
measures the relative Frobenius error of the best rank-r Kronecker sum for each shape, rank and kept
fraction. :func:`load_weight` reads one tensor of a checkpoint on its own, so a whole checkpoint
streams through in the memory of one tensor.

>>> rows = analyze_weight("w", torch.eye(8), ranks=[1], fractions=[], shapes=analyze_shapes(8, 8)).rows
>>> sorted({tuple(r["shape_a"]) for r in rows})[:3]
[(1, 2), (1, 4), (2, 1)]
"""

from __future__ import annotations

import ctypes
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from .budget import candidate_shapes
from .checkpoint import TensorInfo
from .errors import KronfactError
from .kron import FactorShape, factor_shapes, kron_spectrum, max_rank, spectrum_errors

# The modules that are Conv1D in GPT-2-style checkpoints (Checkpoint.conv1d): stored (in, out).
CONV1D_TENSOR = re.compile(r"(^|\.)(c_attn|c_proj|c_fc|q_attn)\.weight$")
PLOT_FRACTIONS = [round(0.01 * 1.2**k, 4) for k in range(26)]  # 1% … ~95% of a layer's parameters


def _log_spread(values: list[int], k: int) -> list[int]:
    """``k`` of the sorted ``values`` closest to a geometric grid from the first to the last (both kept)."""
    lo, hi = math.log(values[0]), math.log(values[-1])
    return sorted({min(values, key=lambda v: abs(math.log(v) - lo - (hi - lo) * i / max(k - 1, 1)))
                   for i in range(k)})


def analyze_shapes(out_features: int, in_features: int, grid: int = 4, max_side: int = 1024) -> list[FactorShape]:
    """The factor shapes ``analyze`` measures for an (out, in) weight: a cheap grid, not all of them.

    m1 takes ``grid`` divisors of out_features spread geometrically from 1 to out_features, n1 the
    same for in_features, and every pair (m1, n1) is a candidate A shape — so the corners are there:
    A (out, 1) ⊗ B (1, in) is plain low rank, A (1, n) or B (m, 1) split only one side. Left out:
    a scalar factor (A or B 1×1), A (1, in) (the same spectrum as A (out, 1)), and shapes whose
    rearranged matrix (m1·n1) × (m2·n2) has a short side above ``max_side`` (one spectrum costs
    O(out·in·short side)). ``grid=0`` keeps every shape within ``max_side``. On the trained layers of
    ../shared/models/tiny-gpt2-shakespeare the best grid-4 shape per kept fraction is within 0.001
    (mean) of the best of all 100–400 shapes. The solver's own candidates
    (:func:`kronfact.budget.candidate_shapes`) are always measured, whatever their size.
    """
    every = factor_shapes(out_features, in_features)
    ms, ns = sorted({s.shape_a[0] for s in every}), sorted({s.shape_a[1] for s in every})
    if grid:
        ms, ns = _log_spread(ms, grid), _log_spread(ns, grid)
    shapes = {(m1, n1) for m1 in ms for n1 in ns} - {(1, 1), (out_features, in_features), (1, in_features)}
    solver = set(candidate_shapes(out_features, in_features))
    return [s for s in every if s.shape_a in solver or (s.shape_a in shapes and min(
        s.shape_a[0] * s.shape_a[1], s.shape_b[0] * s.shape_b[1]) <= max_side)]


@dataclass
class LayerAnalysis:
    """Errors of every candidate shape for one weight (nn.Linear orientation (out, in))."""

    name: str
    shape: tuple[int, int]
    rows: list[dict[str, Any]]  # {name, shape, shape_a, shape_b, rank, params, rel_error, solver[, fraction, best]}
    curve: list[float]  # best relative error at each of PLOT_FRACTIONS (nan where no candidate fits)


def _row(name: str, shape: tuple[int, int], s: FactorShape, rank: int, errors: list[float], solver: bool,
         **extra: Any) -> dict:
    return {"name": name, "shape": list(shape), "shape_a": list(s.shape_a), "shape_b": list(s.shape_b),
            "rank": rank, "params": rank * s.params_per_term, "rel_error": errors[rank], "solver": solver, **extra}


def analyze_weight(name: str, weight: torch.Tensor, ranks: list[int], fractions: list[float],
                   shapes: list[FactorShape]) -> LayerAnalysis:
    """Relative Frobenius error of the best rank-r Kronecker sum for each shape, rank and kept fraction.

    ``weight`` is (out, in); a kept fraction f allows rank ⌊f·out·in / (m1·n1 + m2·n2)⌋ (capped at
    the shape's maximum rank), and the best shape per fraction is the fitting one of least error among
    the solver's candidates (``solver`` in each row: :func:`kronfact.compress` considers that shape).
    """
    shape = (weight.shape[0], weight.shape[1])
    n = shape[0] * shape[1]
    rows: list[dict[str, Any]] = []
    by_fraction: dict[float, list[dict[str, Any]]] = {f: [] for f in fractions}
    curve = [math.inf] * len(PLOT_FRACTIONS)
    solver_shapes = set(candidate_shapes(*shape))
    for s in shapes:
        solver = s.shape_a in solver_shapes
        errs = spectrum_errors(kron_spectrum(weight, s.shape_a))
        norm = float(errs[0])
        errors = [float(e) / norm if norm > 0 else 0.0 for e in errs]
        top = max_rank(s.shape_a, s.shape_b)
        rows += [_row(name, shape, s, r, errors, solver) for r in ranks if r <= top]
        for f in fractions:
            r = min(int(f * n // s.params_per_term), top)
            if r >= 1:
                by_fraction[f].append(_row(name, shape, s, r, errors, solver, fraction=f, best=False))
        for i, f in enumerate(PLOT_FRACTIONS):
            r = min(int(f * n // s.params_per_term), top)
            if r >= 1:
                curve[i] = min(curve[i], errors[r])
    for candidates in by_fraction.values():
        if candidates:
            considered = [row for row in candidates if row["solver"]] or candidates  # what compress can pick
            min(considered, key=lambda row: (row["rel_error"], row["params"]))["best"] = True
        rows += candidates
    return LayerAnalysis(name, shape, rows, [c if c < math.inf else math.nan for c in curve])


def load_weight(info: TensorInfo, conv1d: bool) -> torch.Tensor:
    """One tensor as float32 (float64 kept), (out, in). Opened on its own: safetensors maps the file, and
    the pages a handle has touched stay resident until it closes — one handle per shard would hold the shard."""
    from safetensors import safe_open

    try:
        with safe_open(info.file, framework="pt") as f:
            weight = f.get_tensor(info.name)
    except Exception as err:  # safetensors' errors carry no stable type across versions
        raise KronfactError(f"{info.file}: cannot read {info.name} ({err}); the file is corrupt") from None
    weight = weight.float() if weight.dtype != torch.float64 else weight
    return weight.T if conv1d and CONV1D_TENSOR.search(info.name) else weight


def release_freed_memory() -> None:
    """Have glibc serve blocks ≥ 1 MB by mmap, returned to the OS when freed. Its default threshold grows
    with the blocks freed, after which freed per-layer buffers stay in the heap: RSS creeps up layer by layer."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
