"""Activation-aware Kronecker factorization: minimise ‖(W − Ŵ)·Xᵀ‖_F instead of ‖W − Ŵ‖_F.

X (tokens, in) holds a layer's calibration inputs, W (out, in) = (m1·m2, n1·n2) its weight in nn.Linear
orientation, Ŵ = Σ_i A_i ⊗ B_i with A_i (m1, n1), B_i (m2, n2). With the input second moment
C = XᵀX / tokens (in, in) the objective is tr((W − Ŵ)·C·(W − Ŵ)ᵀ): only C is needed.

Closed form that keeps the Kronecker structure (:func:`calibrated_decompose`):
1. C ≈ C₁ ⊗ C₂ (C₁ n1×n1, C₂ n2×n2), the nearest Kronecker product (Van Loan), symmetrised and damped
   to be positive definite; Cholesky C₁ = L₁L₁ᵀ, C₂ = L₂L₂ᵀ, so C ≈ (L₁⊗L₂)(L₁⊗L₂)ᵀ.
2. ‖(W − Ŵ)(L₁⊗L₂)‖_F is a plain Kronecker fit of W·(L₁⊗L₂) since (A⊗B)(L₁⊗L₂) = (A·L₁)⊗(B·L₂):
   Van Loan gives Σ A'_i ⊗ B'_i, and un-whitening A_i = A'_i·L₁⁻¹, B_i = B'_i·L₂⁻¹ is exactly optimal
   when C is exactly a Kronecker product.
3. Alternating least squares on the exact objective (full C): with B fixed the objective is a
   quadratic in A, minimised approximately by conjugate gradients preconditioned with the Kronecker
   approximation of C (exact when C is Kronecker, e.g. for plain low-rank shapes), and vice versa. A
   step is kept only if it lowers the objective.

The start of step 3 is the better (on the exact objective) of the closed form and plain Van Loan, so
the calibrated objective never ends above plain Van Loan's.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

from .errors import KronfactError
from .kron import (
    KronFactors,
    check_shape_a,
    check_weight,
    decompose,
    kron_spectrum,
    kron_sum,
    relative_error,
    spectrum_errors,
)
from .layer import KronLinear
from .modules import is_eligible

# Relative damping of the Kronecker moment factors: C₁ + δ·(tr C₁ / n1)·I (same for C₂).
DAMPING = 1e-2
# Preconditioned conjugate-gradient iterations per half-step of the refinement.
_CG_ITERS = 10


# ----------------------------------------------------------------------------------- input moments


def as_call(batch: Any, device: torch.device) -> tuple[tuple, dict, Tensor | None]:
    """A calibration batch → (args, kwargs, attention mask or None), tensors moved to ``device``."""
    def move(v: Any) -> Any:
        return v.to(device) if isinstance(v, Tensor) else v

    if isinstance(batch, Mapping):
        kwargs = {k: move(v) for k, v in batch.items()}
        return (), kwargs, kwargs.get("attention_mask")
    if isinstance(batch, (tuple, list)):
        return tuple(move(v) for v in batch), {}, None
    return (move(batch),), {}, None


def check_token_batches(model: nn.Module, batches: Sequence[Any]) -> int:
    """The number of tokens in ``batches``, after checking them against ``model``'s token embedding.

    A model whose ``get_input_embeddings()`` is an ``nn.Embedding`` takes integer ids: each batch (a
    tensor, a tuple starting with one, or a mapping with ``input_ids``) must hold a 2-D (batch, seq)
    integer tensor with ids in [0, vocabulary). Anything else is a ValueError naming the batch and the
    way out. Models without a token embedding are not checked (their batches count their leading dims).
    """
    if not batches:
        raise KronfactError("calibration= is empty; give a few thousand tokens, e.g. "
                            "kronfact.data.calibration_batches(ids, 32, 256)")
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    vocab = embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None
    tokens = 0
    for i, batch in enumerate(batches):
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else \
            batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(ids, Tensor):
            if vocab is not None:
                raise KronfactError(f"calibration batch {i} is a {type(batch).__name__}; give token-id tensors "
                                    "(batch, seq), tuples starting with one, or mappings with 'input_ids'")
            continue
        if vocab is not None:
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.dim() != 2:
                raise KronfactError(f"calibration batch {i} is a {ids.dtype} tensor of shape {tuple(ids.shape)}; the "
                                    "model takes integer token ids of shape (batch, seq), e.g. tokenizer output")
            if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
                raise KronfactError(f"calibration batch {i} holds token ids in [{int(ids.min())}, {int(ids.max())}], "
                                    f"outside the model's vocabulary [0, {vocab}); tokenize with the model's tokenizer")
        tokens += ids.shape[:2].numel() if ids.dim() >= 2 else ids.numel()
    return tokens


def collect_input_moments(model: nn.Module, module_names: Sequence[str], batches: Iterable[Any]) -> dict[str, Tensor]:
    """The input second moment C = XᵀX / tokens (in_features, in_features) of each named module.

    ``module_names`` name nn.Linear, transformers Conv1D or KronLinear modules of ``model``. Each batch
    is passed to the model as ``model(**batch)`` (a mapping), ``model(*batch)`` (a tuple or list) or
    ``model(batch)`` (a tensor), moved to the model's device. When a mapping holds an
    ``attention_mask`` whose shape matches a layer input's leading dims, masked (padding) positions are
    left out. Runs in eval mode without autograd (the mode is restored); moments are float32 on the
    model's device.
    """
    modules = dict(model.named_modules())
    for name in module_names:
        module = modules.get(name)
        if module is None:
            close = difflib.get_close_matches(name, list(modules), n=3, cutoff=0.5)
            raise KronfactError(f"no module named {name!r} in this {type(model).__name__}"
                                + (f" (closest: {', '.join(close)})" if close else ""))
        if not (is_eligible(module) or isinstance(module, KronLinear)):
            raise KronfactError(f"{name!r} is a {type(module).__name__}; input moments are collected for "
                                "nn.Linear, Conv1D and KronLinear modules only")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys(module_names, 0)
    mask: list[Tensor | None] = [None]

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            m = mask[0]
            x = x[m.bool()] if m is not None and tuple(m.shape) == tuple(x.shape[:-1]) else x.reshape(-1, x.shape[-1])
            x = x.float()
            moment = x.T @ x
            sums[name] = moment if name not in sums else sums[name] + moment
            counts[name] += x.shape[0]
        return record

    modes = {m: m.training for m in model.modules()}  # restored module by module (mixed modes stay mixed)
    with ExitStack() as stack, torch.no_grad():
        for name in dict.fromkeys(module_names):
            stack.callback(modules[name].register_forward_pre_hook(hook(name)).remove)
        model.eval()
        stack.callback(lambda: [m.train(mode) for m, mode in modes.items()])
        for batch in batches:
            args, kwargs, mask[0] = as_call(batch, device)
            model(*args, **kwargs)
    empty = [n for n in module_names if counts[n] == 0]
    if empty:
        raise KronfactError(f"no calibration tokens reached {', '.join(empty)}: pass at least one non-empty batch "
                            "that runs through these modules")
    return {name: sums[name] / counts[name] for name in module_names}


# ------------------------------------------------------------------------------- the objective


def _check_moment(moment: Tensor, in_features: int) -> None:
    if not isinstance(moment, Tensor) or tuple(moment.shape) != (in_features, in_features):
        shape = tuple(moment.shape) if isinstance(moment, Tensor) else type(moment).__name__
        raise KronfactError(f"moment must be the ({in_features}, {in_features}) input second moment XᵀX of the "
                            f"layer (see collect_input_moments), got {shape}")
    if not moment.is_floating_point() or not bool(torch.isfinite(moment).all()):
        raise KronfactError("moment must be a finite floating-point tensor")


def _objective(w: Tensor, c: Tensor, a: Tensor, b: Tensor) -> float:
    """tr((W − Ŵ)·C·(W − Ŵ)ᵀ) for Ŵ = Σ a_i ⊗ b_i (all float64)."""
    d = w - kron_sum(a, b)
    return float(((d @ c) * d).sum())


def damped(c: Tensor, damping: float) -> Tensor:
    """(C + Cᵀ)/2 + δ·(mean diagonal)·I: a second moment (Gram) ridge-damped relative to its scale.

    >>> damped(torch.tensor([[2.0, 1.0], [0.0, 4.0]]), 0.5)
    tensor([[3.5000, 0.5000],
            [0.5000, 5.5000]])
    """
    c = (c + c.T) / 2
    scale = float(c.diagonal().mean().clamp_min(1e-12))
    return c + damping * scale * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


def calibrated_error(weight: Tensor, factors: KronFactors, moment: Tensor) -> float:
    """‖(W − Ŵ)·Xᵀ‖_F / ‖W·Xᵀ‖_F = √(tr(D·C·Dᵀ) / tr(W·C·Wᵀ)), D = W − Ŵ, C = ``moment`` (in, in).

    ``weight`` (out, in); ``factors`` a (r, m1, n1), b (r, m2, n2). Computed in float64. 0 when
    W·Xᵀ = 0 and the fit is exact there.
    """
    check_weight(weight)
    _check_moment(moment, weight.shape[1])
    w, c = weight.detach().double(), moment.detach().double()
    num = _objective(w, c, factors.a.detach().double(), factors.b.detach().double())
    den = float(((w @ c) * w).sum())
    num = max(num, 0.0)
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


# ----------------------------------------------------------------------------- the closed form


def _damped_cholesky(m: Tensor, damping: float) -> Tensor:
    """Lower Cholesky factor of the symmetric part of ``m`` + δ·(tr/n)·I, δ raised until it is SPD."""
    m = (m + m.T) / 2
    n = m.shape[0]
    scale = float(m.diagonal().mean().abs()) or 1.0
    eye = torch.eye(n, dtype=m.dtype, device=m.device)
    delta = damping
    for _ in range(12):
        chol, info = torch.linalg.cholesky_ex(m + delta * scale * eye)
        if int(info) == 0:
            return chol
        delta = max(delta * 10, 1e-10)
    raise KronfactError("the input moment is too ill-conditioned to whiten; check the calibration inputs")


def kronecker_moment(moment: Tensor, n1: int, damping: float = DAMPING) -> tuple[Tensor, Tensor]:
    """Cholesky factors L₁ (n1, n1), L₂ (n2, n2) with L₁L₁ᵀ ⊗ L₂L₂ᵀ ≈ ``moment`` (n1·n2, n1·n2).

    C₁ ⊗ C₂ is the Frobenius-nearest Kronecker product (Van Loan), signed so both factors have a
    positive trace (they are PSD for a PSD moment), then each damped by ``damping``·(mean diagonal).
    """
    c = moment.detach().double()
    fit = decompose(c, (n1, n1), rank=1, svd="exact")
    c1, c2 = fit.a[0], fit.b[0]
    if float(c1.trace()) < 0:
        c1, c2 = -c1, -c2
    return _damped_cholesky(c1, damping), _damped_cholesky(c2, damping)


def _whiten(w: Tensor, l1: Tensor, l2: Tensor) -> Tensor:
    """W·(L₁⊗L₂) without forming the Kronecker product: (out, n1·n2) → (out, n1·n2)."""
    n1, n2 = l1.shape[0], l2.shape[0]
    return torch.einsum("ojl,jk,lm->okm", w.reshape(-1, n1, n2), l1, l2).reshape(w.shape)


def calibrated_spectrum(weight: Tensor, moment: Tensor, shape_a: Sequence[int], damping: float = DAMPING) -> Tensor:
    """Singular values of R(W·(L₁⊗L₂)), descending — :func:`kronfact.kron_spectrum` of the whitened weight.

    ``spectrum_errors(σ)[r] / ‖σ‖`` is the relative calibrated error of the closed form at rank r when
    C is exactly C₁ ⊗ C₂ (an estimate otherwise): the data-aware error curve for a budget solver.
    """
    check_weight(weight)
    m1, n1 = check_shape_a(*weight.shape, shape_a)
    _check_moment(moment, weight.shape[1])
    l1, l2 = kronecker_moment(moment, n1, damping)
    return kron_spectrum(_whiten(weight.detach().double(), l1, l2), (m1, n1))


def calibrated_error_curve(weight: Tensor, moment: Tensor, shape_a: Sequence[int], damping: float = DAMPING) -> Tensor:
    """Relative calibrated error of the closed form at every rank 0 … len(σ), shape (len(σ) + 1,), float64.

    The data-aware counterpart of ``spectrum_errors(kron_spectrum(W, shape_a)) / ‖W‖``, from
    :func:`calibrated_spectrum` (exact when the moment is a Kronecker product, an estimate otherwise;
    the refinement of :func:`calibrated_decompose` only lowers it).
    """
    sigma = calibrated_spectrum(weight, moment, shape_a, damping)
    norm = float(sigma.to(torch.float64).norm())
    return spectrum_errors(sigma) / (norm if norm > 0 else 1.0)


def calibration_errors(model: nn.Module, module_names: Sequence[str], batches: Iterable[Any],
                       damping: float = DAMPING) -> Callable[[str, Tensor, Sequence[int]], Tensor]:
    """Calibration batches → the error-curve function a budget solver can use instead of the Frobenius one.

    Collects the input moments of ``module_names`` once (:func:`collect_input_moments`) and returns
    ``errors(name, weight, shape_a)`` → :func:`calibrated_error_curve` of that layer (rank 0 … max).
    """
    moments = collect_input_moments(model, module_names, batches)

    def errors(name: str, weight: Tensor, shape_a: Sequence[int]) -> Tensor:
        if name not in moments:
            raise KronfactError(f"no calibration moment for {name!r}; collected for {sorted(moments)}")
        return calibrated_error_curve(weight, moments[name], shape_a, damping)

    return errors


# ---------------------------------------------------------------------------------- refinement


def _swap(t: Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> Tensor:
    """Re-index a (p1·p2, q1·q2) matrix as (p2·p1, q2·q1): the Kronecker roles of A and B exchanged."""
    (p1, p2), (q1, q2) = rows, cols
    return t.reshape(p1, p2, q1, q2).permute(1, 0, 3, 2).reshape(p1 * p2, q1 * q2)


def _refine_factor(c: Tensor, wc: Tensor, a: Tensor, b: Tensor, l1: Tensor, l2: Tensor, iters: int) -> Tensor:
    """A better A (r, m1, n1) for fixed B (r, m2, n2) on tr(D·C·Dᵀ), D = W − Σ A_i ⊗ B_i, by preconditioned CG.

    With B fixed the objective is a quadratic in A whose minimiser solves H(A) = R, where
    H(X) = T(Σ_i X_i ⊗ B_i · C) and R = T(W·C) for T(E)[r, i1, j1] = Σ_{i2,j2} E[(i1,i2), (j1,j2)]·B[r, i2, j2].
    ``wc`` = W·C (m1·m2, n1·n2), ``c`` = C (n1·n2, n1·n2). Matrix-free: each iteration costs one
    (out, in)×(in, in) GEMM. The preconditioner is H's exact inverse when C = C₁ ⊗ C₂ (``l1``, ``l2``:
    their Cholesky factors): X ↦ P⁻¹·X·C₁⁻¹ with P[r, s] = ⟨B_s·C₂, B_r⟩. CG starts at the current A,
    so every iterate lowers the objective (or keeps it).
    """
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape

    def contract(e: Tensor) -> Tensor:
        return torch.einsum("aibj,rij->rab", e.reshape(m1, m2, n1, n2), b)

    def hess(x: Tensor) -> Tensor:
        return contract(kron_sum(x, b) @ c)

    p_chol = _damped_cholesky(torch.einsum("sij,jk,rik->rs", b, l2 @ l2.T, b), 1e-10)

    def precondition(y: Tensor) -> Tensor:
        z = torch.cholesky_solve(y.reshape(r, m1 * n1), p_chol)
        return torch.cholesky_solve(z.reshape(r * m1, n1).T, l1).T.reshape(r, m1, n1)

    x = a.clone()
    res = contract(wc) - hess(x)
    z = precondition(res)
    d, rz = z, float((res * z).sum())
    rz0 = rz
    for _ in range(iters):
        hd = hess(d)
        dhd = float((d * hd).sum())
        if dhd <= 0 or rz <= 1e-24 * rz0:
            break
        alpha = rz / dhd
        x, res = x + alpha * d, res - alpha * hd
        z = precondition(res)
        rz_new = float((res * z).sum())
        d, rz = z + (rz_new / rz) * d, rz_new
    return x


# ----------------------------------------------------------------------------------- public fit


def calibrated_decompose(weight: Tensor, moment: Tensor, shape_a: Sequence[int], rank: int = 1, *,
                         damping: float = DAMPING, refine: int = 2, svd: str = "auto") -> KronFactors:
    """Σ_{i<rank} A_i ⊗ B_i minimising ‖(W − Ŵ)·Xᵀ‖_F for ``moment`` C = XᵀX / tokens (in, in).

    ``weight`` (m1·m2, n1·n2); ``shape_a`` = (m1, n1). The start is the better, on the calibrated
    objective, of the whitened closed form (module docstring; ``damping`` keeps C₁, C₂ positive
    definite) and plain Van Loan; then ``refine`` sweeps of alternating least squares (A then B, each
    a few preconditioned CG iterations on its normal equations), each update kept only if it lowers
    the objective. Computed in float64; factors a (rank, m1, n1), b (rank, m2, n2) come back in the
    weight's dtype and device, ``rel_error`` is the plain relative Frobenius error (use
    :func:`calibrated_error` for the calibrated one), ``init`` = "calibrated". Cost per sweep ≈
    2·(_CG_ITERS + 2) products (out, in)×(in, in).
    """
    check_weight(weight)
    m1, n1 = check_shape_a(*weight.shape, shape_a)
    _check_moment(moment, weight.shape[1])
    if not isinstance(refine, int) or isinstance(refine, bool) or refine < 0:
        raise KronfactError(f"refine must be a non-negative int (number of ALS sweeps), got {refine!r}")
    if not damping >= 0:
        raise KronfactError(f"damping must be ≥ 0, got {damping!r}")
    plain = decompose(weight, (m1, n1), rank, svd=svd)  # validates rank too
    w, c = weight.detach().double(), moment.detach().double().to(weight.device)
    l1, l2 = kronecker_moment(c, n1, damping)
    c = damped(c, damping)
    white = decompose(_whiten(w, l1, l2), (m1, n1), rank, svd=svd)
    a = torch.linalg.solve_triangular(l1, white.a, upper=False, left=False)  # A'·L₁⁻¹
    b = torch.linalg.solve_triangular(l2, white.b, upper=False, left=False)  # B'·L₂⁻¹
    candidates = [(a, b), (plain.a.double(), plain.b.double())]
    scores = [_objective(w, c, *ab) for ab in candidates]
    best = min(range(2), key=scores.__getitem__)
    (a, b), score = candidates[best], scores[best]
    if refine:
        m2, n2 = plain.shape_b
        wc = w @ c
        swapped_c = _swap(c, (n1, n2), (n1, n2))
        swapped_wc = _swap(wc, (m1, m2), (n1, n2))
        for _ in range(refine):
            for side in ("a", "b"):
                if side == "a":
                    cand = (_refine_factor(c, wc, a, b, l1, l2, _CG_ITERS), b)
                else:
                    cand = (a, _refine_factor(swapped_c, swapped_wc, b, a, l2, l1, _CG_ITERS))
                cand_score = _objective(w, c, *cand)
                if cand_score < score:
                    (a, b), score = cand, cand_score
    # flat copies: standard strides even on size-1 dims (torch.kron views its inputs)
    a, b = (t.to(weight.dtype).reshape(-1).clone().reshape(t.shape) for t in (a, b))
    return KronFactors(a=a, b=b, rel_error=relative_error(weight, a, b), init="calibrated")
