"""Kronecker-sum approximation of a matrix: W ≈ Σ_{i<r} A_i ⊗ B_i.

Orientation is nn.Linear's: W has shape (out_features, in_features) = (m1·m2, n1·n2),
A_i has shape ``shape_a`` = (m1, n1), B_i has shape ``shape_b`` = (m2, n2).

Van Loan–Pitsianis: the rearrangement R(W) of shape (m1·n1, m2·n2) turns every m2×n2 block of W
into one row, so R(A ⊗ B) = vec(A)·vec(B)ᵀ and the best rank-r Kronecker sum is the best rank-r
approximation of R(W). Its Frobenius error is √(Σ_{k≥r} σ_k²) of R(W)'s singular values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .errors import KronfactError
from .threads import lapack

Init = Literal["vanloan", "prune", "random"]
INITS: tuple[str, ...] = ("vanloan", "prune", "random")

# Exact decomposition when its cost (p·q·min(p, q) multiply-adds for a p×q matrix) stays below this —
# a LAPACK SVD for float64, the float64 Gram matrix's eigendecomposition otherwise (GEMM-bound, so
# cheaper per multiply-add) — or when the rank asked for is a sizeable part of the spectrum;
# randomized subspace iteration otherwise.
_EXACT_SVD_COST = 2e8
_GRAM_COST = 2e9
# At most this many columns (or rows): the Gram route even for float64.
_GRAM_MAX_DIM = 4
# Randomized SVD stops once an iteration changes the residual error² by less than this fraction
# of it (so the error itself moves by < RANDOMIZED_RTOL / 2 relative per iteration).
RANDOMIZED_RTOL = 1e-4


class FactorShape(NamedTuple):
    """One way to split an (out, in) weight: A is ``shape_a``, B is ``shape_b``."""

    shape_a: tuple[int, int]
    shape_b: tuple[int, int]
    params_per_term: int


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def factor_shapes(out_features: int, in_features: int) -> list[FactorShape]:
    """Every (shape_a, shape_b) with shape_a = (m1, n1), m1 | out_features, n1 | in_features.

    Sorted by parameters per Kronecker term (m1·n1 + m2·n2), then by shape_a.
    """
    for name, v in (("out_features", out_features), ("in_features", in_features)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise KronfactError(f"{name} must be a positive int, got {v!r}")
    shapes = [
        FactorShape((m1, n1), (out_features // m1, in_features // n1),
                    m1 * n1 + (out_features // m1) * (in_features // n1))
        for m1 in _divisors(out_features)
        for n1 in _divisors(in_features)
    ]
    return sorted(shapes, key=lambda s: (s.params_per_term, s.shape_a))


def check_weight(weight: Tensor, what: str = "weight") -> None:
    """Raise ValueError unless ``weight`` is a finite, non-empty, floating-point 2-D tensor."""
    if not isinstance(weight, Tensor):
        raise KronfactError(f"{what} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise KronfactError(f"{what} must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise KronfactError(f"{what} is empty (shape {tuple(weight.shape)})")
    if not weight.is_floating_point():
        raise KronfactError(f"{what} has dtype {weight.dtype}; a floating-point dtype is required "
                            "(float32, float64, float16 or bfloat16)")
    # A float64 sum of a lower-precision weight cannot overflow: it is finite iff every entry is (one pass).
    wide = weight.dtype == torch.float64
    finite = torch.isfinite(weight).all() if wide else weight.sum(dtype=torch.float64).isfinite()
    if not bool(finite):
        raise KronfactError(f"{what} contains NaN or Inf values; cannot factorize it")


def check_shape_a(out_features: int, in_features: int, shape_a: Sequence[int]) -> tuple[int, int]:
    """Validate ``shape_a`` against an (out, in) weight and return it as a tuple (m1, n1)."""
    try:
        m1, n1 = (int(v) for v in shape_a)
        ok = all(float(v) == int(v) for v in shape_a)
    except (TypeError, ValueError):
        ok = False
    if not ok or m1 < 1 or n1 < 1 or out_features % m1 or in_features % n1:
        raise KronfactError(
            f"shape_a={tuple(shape_a) if isinstance(shape_a, Sequence) else shape_a!r} does not divide the "
            f"({out_features}, {in_features}) weight: shape_a = (m1, n1) needs m1 dividing out_features and "
            f"n1 dividing in_features. Valid m1: {_divisors(out_features)}; valid n1: "
            f"{_divisors(in_features)} (see kronfact.factor_shapes({out_features}, {in_features}))"
        )
    return m1, n1


def max_rank(shape_a: tuple[int, int], shape_b: tuple[int, int]) -> int:
    """The largest useful rank: min(m1·n1, m2·n2), the rank of R(W) at most."""
    return min(shape_a[0] * shape_a[1], shape_b[0] * shape_b[1])


def _check_rank(rank: int, limit: int, why: str) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise KronfactError(f"rank must be a positive int, got {rank!r}")
    if rank > limit:
        raise KronfactError(f"rank={rank} is above the maximum {limit} for {why}")
    return rank


def rearrange(weight: Tensor, shape_a: tuple[int, int]) -> Tensor:
    """Van Loan–Pitsianis rearrangement: (m1·m2, n1·n2) → (m1·n1, m2·n2).

    Row (i1, j1) of the result is the m2×n2 block W[i1·m2:(i1+1)·m2, j1·n2:(j1+1)·n2], flattened.
    """
    m1, n1 = shape_a
    m2, n2 = weight.shape[0] // m1, weight.shape[1] // n1
    return weight.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def unrearrange(r: Tensor, shape_a: tuple[int, int], shape_b: tuple[int, int]) -> Tensor:
    """Inverse of :func:`rearrange`: (m1·n1, m2·n2) → (m1·m2, n1·n2)."""
    (m1, n1), (m2, n2) = shape_a, shape_b
    return r.reshape(m1, n1, m2, n2).permute(0, 2, 1, 3).reshape(m1 * m2, n1 * n2)


def kron_sum(a: Tensor, b: Tensor) -> Tensor:
    """Σ_i a_i ⊗ b_i for a (r, m1, n1) and b (r, m2, n2) → (m1·m2, n1·n2), in one contraction."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    return torch.einsum("rik,rjl->ijkl", a, b).reshape(m1 * m2, n1 * n2)


def permute_weight(k: Tensor, in_perm: Tensor | None, out_perm: Tensor | None, transposed: bool = False) -> Tensor:
    """The weight of a layer computing y = (x[..., in_perm]·kᵀ)[..., out_perm]: k (out, in) with rows
    gathered by ``out_perm`` and columns scattered by ``in_perm`` (None: that side unpermuted).
    ``transposed``: k and the result are the (in, out) transposes."""
    out_dim, in_dim = (1, 0) if transposed else (0, 1)
    if out_perm is not None:
        k = k.index_select(out_dim, out_perm)
    if in_perm is not None:
        k = torch.empty_like(k).index_copy(in_dim, in_perm, k)
    return k


def _compute_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def kron_spectrum(weight: Tensor, shape_a: Sequence[int]) -> Tensor:
    """Singular values of R(weight), descending, shape (min(m1·n1, m2·n2),).

    The best rank-r Kronecker sum has Frobenius error √(Σ_{k≥r} σ_k²), so one call gives the
    error at every rank. A float64 SVD for float64 weights; otherwise the square roots of
    :func:`gram_eigvals` (as accurate as a float32 SVD, and GEMM-bound). On the weight's device.
    """
    check_weight(weight)
    shape_a = check_shape_a(*weight.shape, shape_a)
    r_mat = rearrange(weight.detach(), shape_a)
    if weight.dtype == torch.float64:
        return lapack(torch.linalg.svdvals, r_mat)
    return gram_eigvals(r_mat).sqrt().to(torch.float32)


def _gram(r_mat: Tensor) -> Tensor:
    """The smaller Gram matrix of (a stack of) p×q matrices, in float64: Rᵀ·R if p ≥ q, else R·Rᵀ."""
    m64 = r_mat.to(torch.float64)
    return m64.mT @ m64 if m64.shape[-2] >= m64.shape[-1] else m64 @ m64.mT


def gram_eigvals(r_mat: Tensor) -> Tensor:
    """Squared singular values of (a stack of) p×q matrices (..., p, q), descending, float64, shape
    (..., min(p, q)): the eigenvalues of the smaller Gram matrix. One GEMM and a symmetric
    eigensolver — several times cheaper than an SVD of a skinny matrix, and free of the LAPACK SVD's
    collapse when its threads share cores with another process — exact to float64 rounding of
    σ_max², i.e. far below float32 resolution."""
    return lapack(torch.linalg.eigvalsh, _gram(r_mat)).flip(-1).clamp_min(0)


def spectrum_errors(sigma: Tensor) -> Tensor:
    """Frobenius error of the best rank-r sum for r = 0 … len(sigma): shape (len(sigma) + 1,)."""
    s2 = sigma.to(torch.float64).square().flip(0)
    tail = torch.cat([s2.new_zeros(1), s2.cumsum(0)]).flip(0)  # tail[r] = Σ_{k≥r} σ_k²
    return tail.clamp_min(0).sqrt()


@dataclass(frozen=True)
class KronFactors:
    """W ≈ Σ_i a[i] ⊗ b[i] with a (r, m1, n1) and b (r, m2, n2)."""

    a: Tensor
    b: Tensor
    rel_error: float  # ‖W − Σ a_i ⊗ b_i‖_F / ‖W‖_F, measured against the weight it came from
    init: str

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape_a(self) -> tuple[int, int]:
        return (self.a.shape[1], self.a.shape[2])

    @property
    def shape_b(self) -> tuple[int, int]:
        return (self.b.shape[1], self.b.shape[2])

    @property
    def num_params(self) -> int:
        return self.a.numel() + self.b.numel()

    def to_dense(self) -> Tensor:
        """Σ_i a_i ⊗ b_i, shape (m1·m2, n1·n2)."""
        return kron_sum(self.a, self.b)


def _sign_fix(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Deterministic signs: the largest-magnitude entry of every column of u is positive."""
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u.gather(0, idx[None]).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, v * signs


def _randomized_svd(r_mat: Tensor, rank: int, total_sq: float, rtol: float,
                    max_iter: int = 30) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`rank` singular triplets by subspace iteration, stopped when the residual converges.

    Oversampled block (rank + 8 columns, seeded start, QR re-orthonormalization each half-step).
    The result is an orthogonal projection of R, so its error² is exactly ‖R‖² − Σσ_i²
    (``total_sq`` = ‖R‖²); iteration stops when an iteration changes that by < rtol of itself.
    """
    p, q = r_mat.shape
    k = min(rank + 8, min(p, q))
    gen = torch.Generator(device=r_mat.device).manual_seed(0)
    basis = torch.randn(q, k, generator=gen, device=r_mat.device, dtype=r_mat.dtype)
    qmat = lapack(torch.linalg.qr, r_mat @ basis).Q
    energy = -1.0
    for _ in range(max_iter):
        z = lapack(torch.linalg.qr, r_mat.T @ qmat).Q
        qmat = lapack(torch.linalg.qr, r_mat @ z).Q
        s = lapack(torch.linalg.svdvals, qmat.T @ r_mat)[:rank]
        new_energy = float(s.to(torch.float64).square().sum())
        if abs(new_energy - energy) <= rtol * max(total_sq - new_energy, 1e-12 * total_sq):
            break
        energy = new_energy
    u_small, s, vh = lapack(torch.linalg.svd, qmat.T @ r_mat, full_matrices=False)
    return (qmat @ u_small[:, :rank]), s[:rank], vh[:rank].T


def _norm_sq(x: Tensor) -> float:
    return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2


def top_singular(r_mat: Tensor, rank: int, method: str = "auto",
                 total_sq: float | None = None) -> tuple[Tensor, Tensor, Tensor, float]:
    """Top singular triplets of a p×q matrix, exact or randomized, signs fixed.

    Returns u (p, rank), s (rank,), v (q, rank) and the squared Frobenius error of u·diag(s)·vᵀ.
    ``total_sq`` (‖r_mat‖², computed if not given) saves a pass over a large matrix.
    """
    p, q = r_mat.shape
    gram = r_mat.dtype != torch.float64 or min(p, q) <= _GRAM_MAX_DIM
    if method == "auto":
        cost = p * q * min(p, q)
        small = cost <= (_GRAM_COST if gram else _EXACT_SVD_COST) or 4 * rank >= min(p, q)
        if gram and cost > _EXACT_SVD_COST and 32 * (rank + 8) <= min(p, q):
            small = False  # a few terms of a large matrix: subspace iteration beats a full eigendecomposition
        method = "exact" if small else "randomized"
    if method == "exact" and gram:
        # Eigendecomposition of the float64 Gram matrix: exact to float64 rounding (far below the
        # float32 resolution of the weight; float64 weights take it only for very skinny R, e.g. B of
        # 1×4), and several times faster than a Householder SVD of a skinny matrix.
        flip = p < q
        m64 = (r_mat.T if flip else r_mat).to(torch.float64)
        evals, evecs = lapack(torch.linalg.eigh, _gram(m64))
        s_all = evals.flip(0).clamp_min(0).sqrt()
        v = evecs.flip(1)[:, :rank]
        s = s_all[:rank]
        u = (m64 @ v) / torch.where(s > 0, s, torch.ones_like(s))
        err_sq = float(s_all[rank:].square().sum())
        u, v = (v, u) if flip else (u, v)
        u, s, v = u.to(r_mat.dtype), s.to(r_mat.dtype), v.to(r_mat.dtype)
    elif method == "exact":
        u, s, vh = lapack(torch.linalg.svd, r_mat, full_matrices=False)
        err_sq = float(s[rank:].to(torch.float64).square().sum())
        u, s, v = u[:, :rank], s[:rank], vh[:rank].T
    elif method == "randomized":
        if total_sq is None:
            total_sq = _norm_sq(r_mat)
        u, s, v = _randomized_svd(r_mat, rank, total_sq, RANDOMIZED_RTOL)
        err_sq = max(total_sq - float(s.to(torch.float64).square().sum()), 0.0)
    else:
        raise KronfactError(f"svd method must be 'auto', 'exact' or 'randomized', got {method!r}")
    u, v = _sign_fix(u, v)
    return u, s, v, err_sq


def decompose(
    weight: Tensor,
    shape_a: Sequence[int],
    rank: int = 1,
    init: Init = "vanloan",
    *,
    prune_index: Sequence[tuple[int, int]] | None = None,
    svd: Literal["auto", "exact", "randomized"] = "auto",
    generator: torch.Generator | None = None,
) -> KronFactors:
    """Approximate ``weight`` (m1·m2, n1·n2) by Σ_{i<rank} A_i ⊗ B_i, A_i of shape ``shape_a``.

    - ``"vanloan"``: top singular triplets of R(W), balanced (A_i = √σ_i·u_i, B_i = √σ_i·v_i, so
      ‖A_i‖ = ‖B_i‖), signs deterministic. The Frobenius-optimal rank-r sum. ``svd="auto"`` runs an
      exact SVD when it is cheap and a randomized one (converged to ``RANDOMIZED_RTOL`` in
      captured energy) otherwise.
    - ``"prune"``: B_i one-hot at (p, q), A_i = W[p::m2, q::n2] — a strided slice of W kept as is.
      ``prune_index`` fixes the (p, q) of each term; by default the ``rank`` slices of largest
      Frobenius norm. The error is the norm of the slices dropped.
    - ``"random"``: Gaussian factors scaled so Σ A_i ⊗ B_i has the weight's standard deviation.

    Factors come back in the weight's dtype and on its device. Shapes: a (rank, m1, n1),
    b (rank, m2, n2).
    """
    check_weight(weight)
    out_f, in_f = weight.shape
    shape_a = check_shape_a(out_f, in_f, shape_a)
    shape_b = (out_f // shape_a[0], in_f // shape_a[1])
    if init not in INITS:
        raise KronfactError(f"init must be one of {INITS}, got {init!r}")
    limit = shape_b[0] * shape_b[1] if init == "prune" else max_rank(shape_a, shape_b)
    if init == "prune" and prune_index is not None:
        rank = len(prune_index)
    _check_rank(rank, limit, f"shape_a={shape_a}, shape_b={shape_b} with init={init!r}")

    w = weight.detach().to(_compute_dtype(weight))
    r_mat = rearrange(w, shape_a)
    norm_sq = _norm_sq(w)
    if init == "vanloan":
        u, s, v, err_sq = top_singular(r_mat, rank, svd, norm_sq)
        root = s.clamp_min(0).sqrt()
        a = (u * root).T.reshape(rank, *shape_a)
        b = (v * root).T.reshape(rank, *shape_b)
    elif init == "prune":
        cols = _prune_columns(r_mat, rank, shape_b, prune_index)
        dropped = torch.ones(r_mat.shape[1], dtype=torch.bool, device=w.device)
        dropped[cols] = False
        err_sq = _norm_sq(r_mat[:, dropped])
        a = r_mat[:, cols].T.reshape(rank, *shape_a)
        b = torch.zeros(rank, shape_b[0] * shape_b[1], dtype=w.dtype, device=w.device)
        b[torch.arange(rank, device=w.device), cols] = 1
        b = b.reshape(rank, *shape_b)
    else:
        std = float(w.std()) if w.numel() > 1 else float(w.abs().mean())
        scale = (std**2 / rank) ** 0.25
        a = torch.randn(rank, *shape_a, generator=generator, dtype=w.dtype, device="cpu").to(w.device) * scale
        b = torch.randn(rank, *shape_b, generator=generator, dtype=w.dtype, device="cpu").to(w.device) * scale
        err_sq = None

    a, b = a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous()
    if err_sq is None or weight.dtype not in (torch.float32, torch.float64):
        rel = relative_error(weight, a, b)  # measured: random factors, or rounding to a low-precision dtype
    else:
        rel = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0
    return KronFactors(a=a, b=b, rel_error=rel, init=init)


def _prune_columns(r_mat: Tensor, rank: int, shape_b: tuple[int, int],
                   prune_index: Sequence[tuple[int, int]] | None) -> Tensor:
    """Columns of R(W) (= strided slices of W) kept by the pruning init."""
    m2, n2 = shape_b
    if prune_index is None:
        norms = r_mat.square().sum(0)
        return torch.argsort(norms, descending=True, stable=True)[:rank]
    cols = []
    for pq in prune_index:
        try:
            p, q = (int(v) for v in pq)
        except (TypeError, ValueError):
            raise KronfactError(f"prune_index entries must be (p, q) pairs, got {pq!r}") from None
        if not (0 <= p < m2 and 0 <= q < n2):
            raise KronfactError(f"prune_index entry {(p, q)} is outside shape_b={shape_b}: "
                                f"need 0 ≤ p < {m2} and 0 ≤ q < {n2}")
        cols.append(p * n2 + q)
    if len(set(cols)) != len(cols):
        raise KronfactError(f"prune_index has repeated entries: {list(prune_index)}")
    return torch.tensor(cols, device=r_mat.device)


def relative_error(weight: Tensor, a: Tensor, b: Tensor) -> float:
    """‖W − Σ a_i ⊗ b_i‖_F / ‖W‖_F, computed in float64 (0 for an all-zero W matched exactly)."""
    w = weight.detach().to(torch.float64)
    diff = float(torch.linalg.norm(w - kron_sum(a.detach().to(torch.float64), b.detach().to(torch.float64))))
    norm = float(torch.linalg.norm(w))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)
