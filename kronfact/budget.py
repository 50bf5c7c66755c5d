"""The budget solver: a (shape_a, rank) per layer so the model fits a parameter budget with the least error.

Every layer i offers options o = (shape_a, rank) — or "keep it dense" — each with a parameter count
p(o) and a relative Frobenius error ε(o), read off exact error curves: one SVD per layer and candidate
shape (:func:`error_curve`, batched over layers of one shape by :func:`error_curves`)
gives ε at every rank. The solver picks one option per layer to

    minimise Σ_i w_i · ε_i(o_i)²   subject to   fixed + Σ_i p(o_i) ≤ budget,

a multiple-choice knapsack, solved by dynamic programming over the parameter count (:func:`solve`).
It is exact, parameter by parameter, when the spare capacity (budget minus every layer's cheapest option)
is below min(500 × layers, 65,536) — then the least objective is also monotone in the budget. Above
that it is exact on a grid that rounds each option's parameters up (so the plan always fits), losing
at most max(``SLACK``, layers / 65,536) of the spare capacity to rounding. ``w_i`` is 1 by default; a
per-layer weight or data-aware error curves (:mod:`kronfact.calibrate`) plug in through
:func:`kronfact.surgery.compress`'s ``error_weights``.

Ranks stop below the dense parameter count (rank · (m1·n1 + m2·n2) < out·in); instead each layer has
the option to stay dense (error 0, out·in parameters), which the solver takes only when that is the
best use of the budget.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .errors import KronfactError
from .kron import check_shape_a, check_weight, factor_shapes, gram_eigvals, kron_spectrum, rearrange
from .threads import parallel_map

# Balanced candidate shapes per layer besides plain low rank (see candidate_shapes).
DEFAULT_BALANCED = 5
# Rounding parameters up to the DP grid loses at most this fraction of the capacity being shared out.
SLACK = 0.002
# Largest DP grid (memory: layers × grid float64).
_MAX_GRID = 1 << 16
# error_curves stacks at most this many float64 elements of rearranged weights per batched solve.
_BATCH_ELEMS = 1 << 24
# Totals this close to the budget count as reaching it.
WITHIN = 0.01


@dataclass(frozen=True)
class Option:
    """One way to store a layer's weight: ``rank`` Kronecker terms of ``shape_a``, or dense (``shape_a`` None,
    rank 0). ``params`` counts the weight part only (the bias is unchanged); ``error`` is relative Frobenius."""

    shape_a: tuple[int, int] | None
    rank: int
    params: int
    error: float

    @property
    def dense(self) -> bool:
        return self.shape_a is None


@dataclass(frozen=True)
class Solution:
    """The chosen option of every layer, the resulting total and the objective Σ w·ε²."""

    choice: list[Option]
    total: int
    objective: float


def candidate_shapes(out_features: int, in_features: int, balanced: int = DEFAULT_BALANCED) -> list[tuple[int, int]]:
    """Default candidate A shapes (m1, n1) for an (out, in) weight: one SVD each, so a handful.

    - plain low rank, A (out, 1) ⊗ B (1, in) — often the best Frobenius fit of trained weights;
    - up to ``balanced`` balanced shapes: m1·n1 within a factor 2 of √(out·in), so the rearranged
      matrix is nearly square. They have the most ranks and the fewest parameters per Kronecker term
      (≈ 2√(out·in)): the finest rank steps. One per A height m1 (m1·n1 closest to √(out·in)),
      heights spread evenly over the sorted divisors of out, so tall and wide A's are both there.

    Shapes whose rearranged matrix has a side of 1 (a single rank) are left out.
    """
    root = math.sqrt(out_features * in_features)
    best: dict[int, tuple[float, tuple[int, int]]] = {}
    for s in factor_shapes(out_features, in_features):
        p, q = s.shape_a[0] * s.shape_a[1], s.shape_b[0] * s.shape_b[1]
        if min(p, q) < 2 or s.shape_a == (1, in_features) or not root / 2 <= p <= 2 * root:
            continue  # A (1, in) ⊗ B (out, 1) is plain low rank again
        key = abs(math.log(p / root))
        if s.shape_a[0] not in best or key < best[s.shape_a[0]][0]:
            best[s.shape_a[0]] = (key, s.shape_a)
    heights = sorted(best)
    if len(heights) > balanced:
        heights = sorted({heights[round(i * (len(heights) - 1) / max(balanced - 1, 1))] for i in range(balanced)})
    shapes = [(out_features, 1)] if min(out_features, in_features) >= 2 else []
    return shapes + [best[m][1] for m in heights if best[m][1] not in shapes]


def error_curve(weight: Tensor, shape_a: Sequence[int], init: str = "vanloan") -> Tensor:
    """Relative Frobenius error of ``decompose(weight, shape_a, r, init)`` for r = 0 … max, float64.

    ``weight`` (out, in). ``"vanloan"``: from the spectrum of R(W) (length min(m1·n1, m2·n2) + 1).
    ``"prune"``: from the norms of R(W)'s columns, the strided slices pruning keeps (length m2·n2 + 1).
    ``"random"`` has no error curve (random factors): the Van Loan curve is used to plan it.
    """
    return error_curves([weight], shape_a, init)[0]


def _relative_tails(s2: Tensor) -> Tensor:
    """√(Σ_{k≥r} s2_k / Σ_k s2_k) for r = 0 … n, per row of s2 (..., n) (float64; zeros for a zero row)."""
    tail = torch.cat([s2.new_zeros(*s2.shape[:-1], 1), s2.flip(-1).cumsum(-1)], -1).flip(-1).clamp_min(0)
    total = tail[..., :1]
    return (tail / torch.where(total > 0, total, torch.ones_like(total))).sqrt()


def error_curves(weights: Sequence[Tensor], shape_a: Sequence[int], init: str = "vanloan") -> list[Tensor]:
    """:func:`error_curve` of each of ``weights`` (same shape and dtype), on the CPU, batched: the Van Loan curves of
    non-float64 weights come from one Gram-eigenvalue solve per stack of rearranged weights
    (:func:`kronfact.kron.gram_eigvals`), at most ``_BATCH_ELEMS`` elements at a time, the stacks
    solved side by side on the CPU's threads (:func:`kronfact.threads.parallel_map`)."""
    for w in weights:
        check_weight(w)
    shape_a = check_shape_a(*weights[0].shape, shape_a)
    if init == "prune":
        return [_relative_tails(rearrange(w.detach().to(torch.float64), shape_a).square().sum(0)
                                .sort(descending=True).values).cpu() for w in weights]
    # Chunks of at most _BATCH_ELEMS elements, as many as the threads can share evenly, run side by side.
    n, threads = len(weights), torch.get_num_threads()
    chunks = -(-n // max(1, _BATCH_ELEMS // weights[0].numel()))
    chunks = min(n, -(-chunks // threads) * threads)
    size = -(-n // chunks)
    cpu = weights[0].device.type == "cpu"
    found = parallel_map(functools.partial(_spectrum_tails, shape_a=shape_a),
                         [weights[i:i + size] for i in range(0, n, size)], parallel=cpu)
    return [curve for chunk in found for curve in chunk]


def _spectrum_tails(weights: Sequence[Tensor], shape_a: tuple[int, int]) -> list[Tensor]:
    """The Van Loan error curves (on the CPU) of a chunk of same-shape weights."""
    if weights[0].dtype == torch.float64:
        return [_relative_tails(kron_spectrum(w.detach(), shape_a).square()).cpu() for w in weights]
    s2 = gram_eigvals(torch.stack([rearrange(w.detach(), shape_a) for w in weights]))
    return list(_relative_tails(s2).cpu().unbind(0))


def layer_options(curves: dict[tuple[int, int], Tensor], out_features: int, in_features: int, *,
                  rank: int | None = None, max_rank: int | None = None, keep_dense: bool = True) -> list[Option]:
    """A layer's options from its error curves {shape_a: relative error at rank 0 … max}.

    Ranks 1 … min(curve's max, ``max_rank``) with fewer parameters than the dense weight, or just
    ``rank`` when it is pinned (then whatever its size, and no dense option); plus the dense option
    when ``keep_dense``. Raises ValueError when a pinned rank fits none of the shapes.
    """
    dense = out_features * in_features
    options = []
    for shape_a, curve in curves.items():
        m1, n1 = shape_a
        per_term = m1 * n1 + (out_features // m1) * (in_features // n1)
        errors = curve.tolist()
        top = len(errors) - 1
        if rank is not None:
            ranks = [rank] if rank <= top else []
        else:
            ranks = range(1, min(top, max_rank or top, (dense - 1) // per_term) + 1)
        options += [Option(shape_a, r, r * per_term, errors[r]) for r in ranks]
    if rank is not None and not options:
        limits = {s: len(c) - 1 for s, c in curves.items()}
        raise KronfactError(f"rank={rank} is above the maximum rank of every candidate shape ({limits})")
    if rank is None and keep_dense:
        options.append(Option(None, 0, dense, 0.0))
    return options


def _reachable_error(budget: int, smallest: int, largest: int) -> KronfactError:
    return KronfactError(f"budget of {budget:,} parameters is unreachable: with these layers and options the "
                      f"smallest reachable total is {smallest:,} and the largest {largest:,} (every layer at its "
                      "largest option); pick a budget in between, or select other layers")


def solve(options: Sequence[Sequence[Option]], budget: int, fixed: int = 0,
          weights: Sequence[float] | None = None) -> Solution:
    """One option per layer minimising Σ w_i·ε_i² with fixed + Σ params ≤ ``budget`` (see the module docstring).

    ``fixed``: the parameters that do not change (everything but the selected weights). Raises
    ValueError, stating the smallest and largest reachable totals, when ``budget`` is below the
    smallest or more than ``WITHIN`` above the largest. Among equal objectives the larger total wins.
    """
    if not options or any(not opts for opts in options):
        raise KronfactError("every layer needs at least one option")
    weights = [1.0] * len(options) if weights is None else [float(w) for w in weights]
    if len(weights) != len(options) or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise KronfactError(f"weights must be {len(options)} finite non-negative numbers, got {weights}")
    low = [min(o.params for o in opts) for opts in options]
    high = [max(o.params for o in opts) for opts in options]
    smallest, largest = fixed + sum(low), fixed + sum(high)
    if budget < smallest or largest < (1 - WITHIN) * budget:
        raise _reachable_error(budget, smallest, largest)

    spare = budget - smallest  # parameters to share out above every layer's cheapest option
    grid = max(1, math.ceil(spare / _MAX_GRID), int(spare * SLACK / len(options)))
    layers = []  # per layer: units above its cheapest option, cost, option index — one per unit count
    for opts, lo, w in zip(options, low, weights, strict=True):
        units = np.array([-(-(o.params - lo) // grid) for o in opts])
        cost = np.array([w * o.error**2 for o in opts])
        order = np.lexsort((cost, units))
        first = np.unique(units[order], return_index=True)[1]
        keep = order[first]
        layers.append((units[keep], cost[keep], keep))
    size = min(spare // grid, sum(int(u.max()) for u, _, _ in layers)) + 1

    best = np.full(size, np.inf)
    best[0] = 0.0
    tables = [best]  # tables[i][c]: least cost of the first i layers using exactly c units
    for units, cost, _ in layers:
        new = np.full(size, np.inf)
        for u, c in zip(units.tolist(), cost.tolist(), strict=True):
            if u >= size:
                break
            np.minimum(new[u:], tables[-1][:size - u] + c, out=new[u:])
        tables.append(new)

    c = size - 1 - int(np.argmin(tables[-1][::-1]))  # least cost; ties → most units
    objective = float(tables[-1][c])
    choice = []
    for i in range(len(layers) - 1, -1, -1):
        units, cost, keep = layers[i]
        fits = units <= c
        j = int(np.argmin(tables[i][c - units[fits]] + cost[fits]))
        choice.append(options[i][int(keep[fits][j])])
        c -= int(units[fits][j])
    choice.reverse()
    total = fixed + sum(o.params for o in choice)
    return Solution(choice, total, objective)
