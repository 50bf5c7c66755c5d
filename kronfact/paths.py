"""The paths that compute x·(Σ_i A_i ⊗ B_i)ᵀ without building the weight (which :mod:`kronfact.plans` picks).

For one input row x (n1·n2,) reshaped to X (n1, n2): (A ⊗ B)·x = vec(A·X·Bᵀ). With the batch folded into large
GEMMs, B-first runs X·Bᵀ then A·(…), A-first A·X then (…)·Bᵀ; a plain low-rank layer (A a column ⊗ B a row, or
the mirror) is exactly two GEMMs with the bias fused into the second.

A path's decisions (which GEMM call, which reshape is a copy, where the bias goes) depend only on sizes: they are
taken once per (path, tokens, shapes, bias size, grad mode) by :func:`steps`, whose function then runs only the
path's tensor operations — a decoded token's call is mostly Python, and this halves it. Without autograd every
GEMM is a direct call (:func:`_gemm`: thin ones as broadcast products where BLAS is slow); with it, a GEMM with a
size-1 dimension goes through :class:`_MatMul` (whose backward does the same, and autograd's own would materialise
outer products), and so does one whose bias spans several output rows (added in place inside); every other one is
a plain autograd op.

>>> a, b, x = torch.randn(2, 3, 4), torch.randn(2, 5, 6), torch.randn(7, 24)
>>> w1, w2 = path_operands(a, b, "a_first")
>>> y = steps("a_first", 7, 2, (3, 4), (5, 6), None, False)(x, w1, w2, None)
>>> y.shape, torch.allclose(y, x @ kron_sum(a, b).T, atol=1e-4)
(torch.Size([7, 15]), True)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import KronfactError
from .kron import kron_sum
from .plans import FUSED_TRANSPOSE_MIN_DIM, PATHS, THIN_MIN_SIZE, broadcasts

Gemm = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
Steps = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


def _mm(x: Tensor, w: Tensor, bias: None) -> Tensor:
    return torch.mm(x, w)


def _mul(x: Tensor, w: Tensor, bias: None) -> Tensor:
    return x * w


def _column_sum(x: Tensor, w: Tensor, bias: None) -> Tensor:
    """x (m, k) @ w (k, 1) as k broadcast products: at many rows MKL's GEMV with 2 or 3 columns is 2–5× slower
    (1M × 2 rows: 6.4 against 1.4 ms): B (1, 2)'s first GEMM in B-first, the input gradient of B (2, 1)'s last in
    A-first."""
    y = x[:, :1] * w[0]
    for j in range(1, w.shape[0]):
        y.addcmul_(x[:, j:j + 1], w[j])
    return y


def _outer_columns(x: Tensor, w: Tensor, bias: None) -> Tensor:
    """x (m, 1) @ w (1, 2) over many rows, one product per column written into its strided column of the output: as
    one operation the inner loop runs over the two columns (SmolLM2's Krony-PT gate projection at 512 tokens,
    (393216, 1) @ (1, 2): 0.38 ms, against 0.62 as a GEMM and 0.72 as a broadcast product; with more columns,
    :func:`~kronfact.plans.broadcasts` decides). ``out=`` is not differentiable and has no batching rule: when
    autograd records (a double backward, forward-mode AD) or under a torch.func transform, the GEMM."""
    recorded = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    if recorded or torch._C._are_functorch_transforms_active():
        return torch.mm(x, w)
    out = x.new_empty(x.shape[0], w.shape[1])
    for j in range(w.shape[1]):
        torch.mul(x[:, 0], w[0, j], out=out[:, j])
    return out


def _addmm(x: Tensor, w: Tensor, bias: Tensor) -> Tensor:
    return torch.addmm(bias, x, w)


def _addcmul(x: Tensor, w: Tensor, bias: Tensor) -> Tensor:
    return torch.addcmul(bias, x, w)


def _gemm(m: int, k: int, n: int, p: int | None, traced: bool) -> Gemm:
    """The call computing (m, k) @ (k, n), plus a bias (p,) added to every p consecutive outputs (row-major) if
    ``p`` is not None.

    Thin products avoid BLAS where it is slow: with k == 1, a broadcast product, fused with the bias (over many rows
    without one, two columns by :func:`_outer_columns`), except where the GEMM wins after all
    (:func:`~kronfact.plans.broadcasts`); with n == 1 and k of 2 or 3, a sum of broadcast products
    (:func:`_column_sum`) over many rows. In a compiled graph only the latter, always (one vectorized loop over the
    rows): Inductor fuses a broadcast product with what follows (e.g. the MLP's activation) into a loop over the
    product's inner dimension, scalar when that is small (a Krony-PT B of 2×1: 10× slower than the GEMM it
    replaces), while a GEMM stays a library call and leaves the activation vectorized."""
    many = not traced and m * max(k, n) >= THIN_MIN_SIZE
    broadcast = k == 1 and broadcasts(m, n, traced)
    product = _column_sum if n == 1 and k in (2, 3) and (many or traced) else _mm
    if p is None:
        if broadcast:
            return _outer_columns if n == 2 and many else _mul
        return product
    if p == n:
        return _addcmul if broadcast else _addmm
    q = p // n
    if broadcast:  # (m/q, q, 1)·(1, n) + (q, n): broadcasting does the rest
        return lambda x, w, bias: torch.addcmul(bias.view(q, n), x.view(-1, q, 1), w).view(-1, n)

    def with_bias(x: Tensor, w: Tensor, bias: Tensor) -> Tensor:
        out = product(x, w, None)
        out.view(-1, p).add_(bias)
        return out
    return with_bias


def _product(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (m, k) @ w (k, n) [+ bias] by :func:`_gemm`, decided on the spot (for :class:`_MatMul`'s derivatives)."""
    return _gemm(*x.shape, w.shape[1], None if bias is None else bias.numel(), torch.compiler.is_compiling())(
        x, w, bias)


class _MatMul(torch.autograd.Function):
    """x (m, k) @ w (k, n) [+ bias, see :func:`_gemm`] whose backward GEMMs, gx = g·wᵀ and
    gw = xᵀ·g, also take :func:`_gemm`'s forms for thin products — and never materialise
    autograd's (m, n) temporaries of a broadcast product's backward (a k = 1 product's gradients
    are two GEMVs). The bias is added in place inside, where autograd does not see a view."""

    generate_vmap_rule = True  # torch.func.vmap / per-sample gradients

    @staticmethod
    def forward(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return _product(x, w, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, w, bias = inputs
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)
        ctx.bias_size = None if bias is None else bias.numel()

    @staticmethod
    def jvp(ctx, tx: Tensor | None, tw: Tensor | None, tb: Tensor | None) -> Tensor:
        """Forward-mode derivative (torch.func.jvp, jacfwd, hessian): tx·w + x·tw [+ tb, as the bias is added]."""
        x, w = ctx.saved_tensors
        out = _product(tx, w) if tx is not None else x.new_zeros(x.shape[0], w.shape[1])
        if tw is not None:
            out = out + _product(x, tw)
        if tb is not None:
            out = (out.view(-1, tb.numel()) + tb).view(out.shape)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, w = ctx.saved_tensors
        gx = _product(g, w.T) if ctx.needs_input_grad[0] else None
        gw = _product(x.T, g) if ctx.needs_input_grad[1] else None
        gb = g.reshape(-1, ctx.bias_size).sum(0) if ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _grad_gemm(m: int, k: int, n: int, p: int | None, traced: bool) -> Gemm:
    """:func:`_gemm` under autograd: :class:`_MatMul` when a GEMM of the forward or the backward has a size-1
    dimension, or the bias spans several output rows (added in place inside, where autograd does not see a view:
    out of place it is a fresh output-sized tensor, in place through a view a full copy in the backward); else
    plain autograd ops (no Python in the backward): :func:`_gemm`'s, which has no size-1 dimension to special-case
    here but a traced thin product with one output column. Traced, always plain ops (:func:`steps` then adds a
    several-row bias to the output's final shape)."""
    if not traced and (1 in (m, k, n) or p not in (None, n)):
        return _MatMul.apply
    return _gemm(m, k, n, p, traced)


# kronfact's operators (kronfact::transposed here, kronfact::cached_call in compiled.py), defined directly:
# torch.library.custom_op's wrapping costs ~15 µs a call, a decoded token's budget; this, ~3 µs.
LIBRARY = torch.library.Library("kronfact", "FRAGMENT")
LIBRARY.define("transposed(Tensor x, int rows, int cols) -> Tensor")


def _transposed_impl(x: Tensor, rows: int, cols: int) -> Tensor:
    """x viewed (-1, rows, cols), transposed to (-1, cols, rows), contiguous: a copy Inductor cannot fuse into."""
    return x.reshape(-1, rows, cols).transpose(1, 2).contiguous()


def _transposed_fake(x: Tensor, rows: int, cols: int) -> Tensor:
    return x.new_empty(x.numel() // (rows * cols), cols, rows)


def _transposed_backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:
    return _transposed_copy(g, ctx.cols, ctx.rows).reshape(ctx.shape), None, None


def _transposed_context(ctx, inputs, output) -> None:
    x, ctx.rows, ctx.cols = inputs
    ctx.shape = x.shape


LIBRARY.impl("transposed", _transposed_impl, "CompositeExplicitAutograd")
torch.library.register_fake("kronfact::transposed", _transposed_fake, lib=LIBRARY)
torch.library.register_autograd("kronfact::transposed", _transposed_backward, setup_context=_transposed_context,
                                lib=LIBRARY)
_transposed_copy = torch.ops.kronfact.transposed.default


def _transposer(t: int, rows: int, cols: int, traced: bool, to_gemm: bool = False) -> Callable[[Tensor], Tensor]:
    """x (t blocks of rows·cols elements) → every block transposed to (cols, rows): the matrix (t·cols, rows) if
    ``to_gemm`` (it goes to a GEMM, which reads one block's strided view as it is), else in a shape the caller
    reshapes. A copy when both sides exceed 1 (traced, with a small side, by kronfact::transposed; else by reshape)."""
    if min(rows, cols) == 1:
        return (lambda x: x.reshape(t * cols, rows)) if to_gemm else (lambda x: x)
    if to_gemm and t == 1:
        return lambda x: x.reshape(rows, cols).T
    if traced and min(rows, cols) < FUSED_TRANSPOSE_MIN_DIM:  # see plans.FUSED_TRANSPOSE_MIN_DIM
        return lambda x: _transposed_copy(x, rows, cols).view(t * cols, rows)
    if to_gemm:
        return lambda x: x.reshape(t, rows, cols).transpose(1, 2).reshape(t * cols, rows)
    return lambda x: x.reshape(t, rows, cols).transpose(1, 2)  # the caller's reshape copies


def _reverser(t: int, p: int, r: int, q: int) -> Callable[[Tensor], Tensor]:
    """y (t·p, r·q) → (t·q, p·r), rows (t, q) and columns (p, r): a copy if :func:`~kronfact.plans.reorder_copies`,
    else a view (one row: transposed, which the GEMM it goes to reads as it is)."""
    if q == 1 or p * r == 1:
        return lambda y: y.reshape(t * q, p * r)
    if t == 1:
        return lambda y: y.reshape(p * r, q).T
    return lambda y: y.reshape(t, p * r, q).transpose(1, 2).reshape(t * q, p * r)


def _low_rank(x: Tensor, w1: Tensor, w2: Tensor, bias: Tensor | None) -> Tensor:
    """x·w1·w2 + bias as two GEMMs on x's own shape, the bias fused into the second."""
    return F.linear(F.linear(x, w1.T), w2.T, bias)


@functools.lru_cache(maxsize=4096)
def _build(path: str, t: int, r: int, shape_a: tuple[int, int], shape_b: tuple[int, int], p: int | None,
           grad: bool, traced: bool) -> Steps:
    (m1, n1), (m2, n2) = shape_a, shape_b
    out = m1 * m2
    if (path == "b_first" and n1 == 1 and m2 == 1) or (path == "a_first" and m1 == 1 and n2 == 1):
        return _low_rank  # A (out, 1) columns ⊗ B (1, in) rows, or the mirror

    def gemm(m: int, k: int, n: int, bias_size: int | None) -> Gemm:
        return _grad_gemm(m, k, n, bias_size, traced) if grad else _gemm(m, k, n, bias_size, traced)

    if path == "b_first":
        fuse = m2 == 1 or (m1 == 1 and not traced)  # no transpose of the output: the bias goes into the GEMM
        first, second = gemm(t * n1, n2, r * m2, None), gemm(t * m2, r * n1, m1, p if fuse else None)
        reverse, transpose = _reverser(t, n1, r, m2), _transposer(t, m2, m1, traced)
        late = not fuse and p is not None

        def b_first(x: Tensor, w1: Tensor, w2: Tensor, bias: Tensor | None) -> Tensor:
            y = first(x.reshape(t * n1, n2), w1, None)                                # (t·n1, r·m2)
            y = second(reverse(y), w2, None if late else bias)                        # (t·m2, m1)
            y = transpose(y).reshape(*x.shape[:-1], out)
            return y + bias if late else y
        return b_first
    # Traced, a bias spanning several rows of the last GEMM's output is added to the output's final shape instead:
    # through the (t·m1, m2) view, Inductor indexes it by floor-division and modulo of a symbolic token count, a
    # scalar loop (tiny's Krony-PT 25% MLP at 8 tokens after 1: 3-4× slower than static shapes).
    late = traced and m1 > 1 and p is not None
    transpose, reverse = _transposer(t, n1, n2, traced, to_gemm=True), _reverser(t, n2, r, m1)
    first, second = gemm(t * n2, n1, r * m1, None), gemm(t * m1, r * n2, m2, None if late else p)

    def a_first(x: Tensor, w1: Tensor, w2: Tensor, bias: Tensor | None) -> Tensor:
        y = first(transpose(x), w1, None)                                             # (t·n2, r·m1)
        y = second(reverse(y), w2, None if late else bias).reshape(*x.shape[:-1], out)  # (t·m1, m2)
        return y + bias if late else y
    return a_first


def steps(path: str, t: int, r: int, shape_a: tuple[int, int], shape_b: tuple[int, int], p: int | None,
          grad: bool) -> Steps:
    """``path`` ("b_first" or "a_first") for ``t`` rows, a (r, m1, n1) and b (r, m2, n2) (``shape_a`` = (m1, n1),
    ``shape_b`` = (m2, n2)), a bias of ``p`` elements or None, with autograd or not: a function (x (..., n1·n2),
    w1, w2, bias) → (..., m1·m2) of :func:`path_operands` ``w1, w2``. Cached; built anew when traced (``t`` may be
    symbolic)."""
    if path not in ("b_first", "a_first"):
        raise KronfactError(f"path must be one of {PATHS}, got {path!r}")  # "dense" builds the weight instead
    traced = torch.compiler.is_compiling()
    return (_build.__wrapped__ if traced else _build)(path, t, r, shape_a, shape_b, p, grad, traced)


def kron_matmul(x: Tensor, a: Tensor, b: Tensor, path: str, bias: Tensor | None = None, grad: bool = True,
                operands: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """x (..., n1·n2) → x·(Σ_i A_i ⊗ B_i)ᵀ + bias of shape (..., m1·m2), by ``path``; a (r, m1, n1),
    b (r, m2, n2), bias (m1·m2,) or None. ``grad=False`` (nothing needs a gradient) skips the custom
    autograd function; ``operands``: :func:`path_operands` of a, b and ``path``, kept by the caller
    (ignored under autocast, which casts a and b)."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    autocast = torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64
    if autocast:  # as autocast's GEMMs would cast,
        # so that the backward sees one dtype (autocast leaves float64 alone)
        dtype = torch.get_autocast_dtype(x.device.type)
        x, a, b = x.to(dtype), a.to(dtype), b.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if path == "dense":
        return F.linear(x, kron_sum(a, b), bias)
    w1, w2 = operands if operands is not None and not autocast else path_operands(a, b, path)
    t = x.numel() // (n1 * n2)
    return steps(path, t, r, (m1, n1), (m2, n2), None if bias is None else bias.numel(), grad)(x, w1, w2, bias)


def path_operands(a: Tensor, b: Tensor, path: str) -> tuple[Tensor, Tensor]:
    """The weight matrices of the two GEMMs of ``path`` ("b_first" or "a_first") for a (r, m1, n1), b (r, m2,
    n2): b_first (n2, r·m2) and (n1·r, m1), a_first (n1, r·m1) and (n2·r, m2). The first is a view, the
    second a copy when r and n1 (n2) exceed 1, unless the factors are laid out (:meth:`KronLinear.lay_out`) —
    what an inference caller keeps between calls."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    if path == "b_first":
        return b.reshape(r * m2, n2).T, a.permute(2, 0, 1).reshape(n1 * r, m1)
    return a.reshape(r * m1, n1).T, b.permute(2, 0, 1).reshape(n2 * r, m2)
