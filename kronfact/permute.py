"""Permutation-enhanced Kronecker factorization: permute W's rows and columns so Σ A_i ⊗ B_i fits better.

A Kronecker sum ties every row index (i1, i2) and column index (j1, j2) of W (m1·m2, n1·n2) to fixed
positions; trained weights have no reason to put their rows and columns there. We search a row order
``rows`` (out,) and a column order ``cols`` (in,) so that W[rows][:, cols] ≈ K = Σ_{i<r} A_i ⊗ B_i, by
alternating two exact steps (:func:`permuted_decompose`):

- fit: K = Van Loan's best rank-r Kronecker sum of the permuted weight;
- assign: with K fixed, placing original row p at position i costs ‖W[p, cols] − K[i]‖², whose
  assignment-dependent part is −⟨W[p, cols], K[i]⟩: one GEMM gives the (out, out) score matrix and
  ``scipy.optimize.linear_sum_assignment`` the optimal row order; the same for columns.

A step is kept only if it lowers the error, so the error never rises, and the search stops after
``iters`` rounds, at a fixed point, or at an exact fit (a Kronecker sum is left unpermuted).

In a KronLinear the orders become two gathers (``in_perm = cols``, ``out_perm = rows⁻¹``):
y = (x[..., in_perm]·Kᵀ)[..., out_perm] + bias. :func:`fold_permutations` moves an output gather into
the next layer's input gather where the path between them is elementwise (an MLP's activation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from .calibrate import calibrated_decompose, calibrated_error
from .errors import KronfactError
from .kron import KronFactors, check_shape_a, check_weight, decompose, kron_sum, permute_weight
from .layer import KronLinear
from .modules import is_conv1d, is_eligible, linear_weight

# Producer → consumer suffix pairs whose path is elementwise (activation, dropout) in the stock
# transformers MLPs: GPT-2 (c_fc → act → c_proj), OPT (fc1 → fc2), BERT/ViT (intermediate.dense → output.dense).
MLP_PAIRS: tuple[tuple[str, str], ...] = (("c_fc", "c_proj"), ("fc1", "fc2"), ("intermediate.dense", "output.dense"))


@dataclass(frozen=True)
class PermutedFactors:
    """W ≈ K[out_perm][:, in_perm⁻¹] with K = Σ_i factors.a[i] ⊗ factors.b[i], i.e. K ≈ W[out_perm⁻¹][:, in_perm].

    ``in_perm`` (in_features,) and ``out_perm`` (out_features,) are int64 gather indices in
    KronLinear's convention (:meth:`KronLinear.set_permutations`); ``history`` the relative error
    after each round (``history[0]``: unpermuted Van Loan). ``factors.rel_error`` is the error against
    the original weight (permutations keep the norm).
    """

    factors: KronFactors
    in_perm: Tensor
    out_perm: Tensor
    history: tuple[float, ...]

    @classmethod
    def unpermuted(cls, factors: KronFactors) -> PermutedFactors:
        """``factors`` with identity orders (no gathers)."""
        (m1, n1), (m2, n2) = factors.shape_a, factors.shape_b
        arange = lambda n: torch.arange(n, device=factors.a.device)  # noqa: E731
        return cls(factors, arange(n1 * n2), arange(m1 * m2), (factors.rel_error,))

    @property
    def rel_error(self) -> float:
        return self.factors.rel_error

    @property
    def is_identity(self) -> bool:
        return _is_identity(self.in_perm) and _is_identity(self.out_perm)

    def to_dense(self) -> Tensor:
        """The approximation of the original weight, (out_features, in_features)."""
        return permute_weight(self.factors.to_dense(), self.in_perm, self.out_perm)

    def to_layer(self, bias: Tensor | None = None, **kwargs) -> KronLinear:
        """A KronLinear computing x·W̃ᵀ + bias (identity orders are dropped: no gather)."""
        perms = [None if _is_identity(p) else p for p in (self.in_perm, self.out_perm)]
        return KronLinear.from_factors(self.factors, bias, in_perm=perms[0], out_perm=perms[1], **kwargs)


def _is_identity(order: Tensor) -> bool:
    return bool((order == torch.arange(len(order), device=order.device)).all())


def _assign(score: Tensor) -> Tensor:
    """The order maximising Σ_i score[order[i], i] for a square score (n, n): order (n,) int64."""
    from scipy.optimize import linear_sum_assignment  # imported here: 0.4 s, only the search needs it

    rows, cols = linear_sum_assignment(score.detach().cpu().double().numpy(), maximize=True)
    order = np.empty_like(rows)
    order[cols] = rows
    return torch.from_numpy(order).to(score.device)


def permuted_decompose(weight: Tensor, shape_a: Sequence[int], rank: int = 1, *, iters: int = 10,
                       moment: Tensor | None = None, svd: str = "auto", **calibrate_kwargs) -> PermutedFactors:
    """Search row and column orders of ``weight`` (m1·m2, n1·n2) for a better rank-``rank`` Kronecker fit.

    Up to ``iters`` rounds of (row assignment, Van Loan fit, column assignment, Van Loan fit), each
    step kept only if it lowers the relative Frobenius error (see the module docstring); stops early
    at a fixed point or an exact fit. With ``moment`` (in, in) = XᵀX / tokens the final factors come
    from :func:`kronfact.calibrate.calibrated_decompose` of the permuted weight (orders searched on the
    plain objective), kept only if they beat the unpermuted calibrated fit on the calibrated objective.
    Returns factors a (rank, m1, n1), b (rank, m2, n2) in the weight's dtype, orders on its device.
    """
    check_weight(weight)
    shape_a = check_shape_a(*weight.shape, shape_a)
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
        raise KronfactError(f"iters must be a non-negative int, got {iters!r}")
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    out_f, in_f = w.shape
    rows = torch.arange(out_f, device=w.device)
    cols = torch.arange(in_f, device=w.device)
    fit = decompose(w, shape_a, rank, svd=svd)
    history = [fit.rel_error]
    exact = torch.finfo(w.dtype).eps ** 0.5
    for _ in range(iters):
        if fit.rel_error <= exact:
            break
        improved = False
        for axis in (0, 1):
            wp, k = w[rows][:, cols], kron_sum(fit.a, fit.b)
            # score[p, i] = ⟨row (column) p of the permuted weight, row (column) i of the fit⟩
            order = _assign(wp @ k.T if axis == 0 else wp.T @ k)
            if _is_identity(order):
                continue
            new_rows, new_cols = (rows[order], cols) if axis == 0 else (rows, cols[order])
            cand = decompose(w[new_rows][:, new_cols], shape_a, rank, svd=svd)
            if cand.rel_error < fit.rel_error:
                rows, cols, fit, improved = new_rows, new_cols, cand, True
        history.append(fit.rel_error)
        if not improved:
            break
    out_perm = torch.argsort(rows)
    if moment is None:
        moved = len(history) > 1 and history[-1] < history[0]
        factors = KronFactors(fit.a.to(weight.dtype), fit.b.to(weight.dtype), fit.rel_error,
                              "vanloan+permute" if moved else "vanloan")
        return PermutedFactors(factors, cols, out_perm, tuple(history))
    plain = calibrated_decompose(weight, moment, shape_a, rank, svd=svd, **calibrate_kwargs)
    unpermuted = replace(PermutedFactors.unpermuted(plain), history=tuple(history))
    if _is_identity(rows) and _is_identity(cols):
        return unpermuted
    m = moment.detach().to(weight.device)
    permuted = calibrated_decompose(weight[rows][:, cols], m[cols][:, cols], shape_a, rank, svd=svd,
                                    **calibrate_kwargs)
    if calibrated_error(weight[rows][:, cols], permuted, m[cols][:, cols]) < calibrated_error(weight, plain, m):
        factors = KronFactors(permuted.a, permuted.b, permuted.rel_error, "calibrated+permute")
        return PermutedFactors(factors, cols, out_perm, tuple(history))
    return unpermuted


# ------------------------------------------------------------------------------------------ folding


def _default_pairs(model: nn.Module) -> list[tuple[str, str]]:
    names = dict(model.named_modules())
    pairs = []
    for name, module in names.items():
        if not isinstance(module, KronLinear) or module.out_perm is None:
            continue
        for producer, consumer in MLP_PAIRS:
            if name == producer or name.endswith("." + producer):
                target = name[: len(name) - len(producer)] + consumer
                if target in names:
                    pairs.append((name, target))
    return pairs


def fold_permutations(model: nn.Module, pairs: Iterable[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Move each producer KronLinear's ``out_perm`` into its consumer, in place; exact.

    A (producer, consumer) pair is valid when the producer's output reaches only the consumer, through
    elementwise operations (activation, dropout): then gathering the producer's output by ``out_perm``
    equals gathering the consumer's input by it. The producer loses its gather (its bias is scattered
    to match); a KronLinear consumer composes it into ``in_perm`` (one gather instead of two); an
    nn.Linear or Conv1D consumer absorbs it into its weight (no gather at all). ``pairs`` default to the
    stock MLPs of :data:`MLP_PAIRS` (GPT-2, OPT, BERT, ViT) whose producer has an ``out_perm``.
    Returns the pairs folded. The model's function is unchanged.
    """
    modules = dict(model.named_modules())
    pairs = _default_pairs(model) if pairs is None else list(pairs)
    for producer, consumer in pairs:  # validate everything before the first change
        p, c = modules.get(producer), modules.get(consumer)
        if not isinstance(p, KronLinear):
            raise KronfactError(f"producer {producer!r} must be a KronLinear, got {type(p).__name__}")
        if not (isinstance(c, KronLinear) or is_eligible(c)):
            raise KronfactError(f"consumer {consumer!r} must be a KronLinear, nn.Linear or Conv1D, got "
                                f"{type(c).__name__}")
        if p.out_features != (c.in_features if isinstance(c, KronLinear) else linear_weight(c).shape[1]):
            raise KronfactError(f"{producer!r} has {p.out_features} outputs but {consumer!r} takes a different width")
    folded = []
    with torch.no_grad():
        for producer, consumer in pairs:
            p, c = modules[producer], modules[consumer]
            perm = p.out_perm
            if perm is None:
                continue
            if p.bias is not None:  # new output y' with y'[..., perm] = y
                p.bias.copy_(torch.empty_like(p.bias).index_copy(0, perm, p.bias))
            if isinstance(c, KronLinear):
                c.set_permutations(perm if c.in_perm is None else perm[c.in_perm], c.out_perm)
            elif is_conv1d(c):  # weight (in, out): its rows follow the input
                c.weight.copy_(torch.empty_like(c.weight).index_copy(0, perm, c.weight))
            else:
                c.weight.copy_(torch.empty_like(c.weight).index_copy(1, perm, c.weight))
            p.set_permutations(p.in_perm, None)
            folded.append((producer, consumer))
    return folded
