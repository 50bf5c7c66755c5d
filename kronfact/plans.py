"""Execution plans for x·(Σ_i A_i ⊗ B_i)ᵀ: the cost model that picks a path, and the paths themselves.

For one input row x (n1·n2,) reshaped to X (n1, n2): (A ⊗ B)·x = vec(A·X·Bᵀ). With the batch folded
into large GEMMs there are two orders (B-first: X·Bᵀ then A·(…); A-first: A·X then (…)·Bᵀ) besides
materialise-then-GEMM. :func:`plan` picks the cheapest for a layer and a number of tokens with a
roofline cost model that counts the FLOPs and the bytes of every GEMM and every layout copy, plus a
fixed cost per operation (what dominates a single decoded token); its answers are cached.

A plain low-rank layer (A a column ⊗ B a row, or the mirror) runs as exactly two GEMMs with the
bias fused into the second. Without autograd every path calls the GEMMs directly; with it, a GEMM
with a size-1 dimension goes through :class:`_MatMul` (BLAS is slow at rank-1 products and autograd's
own backward would materialise their outer products), and so does one whose bias spans several output
rows (added in place inside); every other one is a plain ``@``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import KronfactError
from .kron import kron_sum

Path = Literal["dense", "b_first", "a_first"]
PATHS: tuple[str, ...] = ("dense", "b_first", "a_first")

# Per device type: machine balance (FLOPs per byte of memory traffic: ~200 GFLOP/s fp32 GEMM over
# ~25 GB/s on a 2-core AVX-512 CPU, near 50 on a datacenter GPU), the extra cost of a freshly
# allocated intermediate, in multiples of writing it once, and the fixed cost of one operation in FLOP
# units: ~20 µs on CPU (dispatch, a small GEMM's packing, a cold cache: measured per op of the Kronecker
# paths on one token, 2 loaded cores), ~5 µs on CUDA (a kernel launch). On CPU, glibc serves
# blocks above 32 MB with mmap, and first-touch page faults cost ~6× the write itself (measured here;
# a caching malloc such as jemalloc or MALLOC_MMAP_THRESHOLD_ removes it); CUDA's caching allocator has none.
MACHINE = {"cpu": (8.0, 6.0, 4e6), "cuda": (50.0, 0.0, 1e8)}
# GEMMs whose inner dimension or output width is below this run below peak: charged proportionally.
# Few rows (a decoded token) are not: such a GEMM streams its weight once and is memory-bound.
_GEMM_FULL_SPEED_DIM = 32


@dataclass(frozen=True)
class Op:
    """One step of a path: a GEMM (m×k)·(k×n), or a copy of ``m`` elements (k = n = 0)."""

    m: int
    k: int = 0
    n: int = 0

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n

    @property
    def out_elems(self) -> int:
        return self.m * self.n if self.k else self.m

    def cost(self, balance: float, elem_bytes: int) -> float:
        """Estimated time in FLOP units: max(compute, memory), roofline style."""
        if not self.k:  # layout copy: read + write
            return 2 * self.m * elem_bytes * balance
        traffic = (self.m * self.k + self.k * self.n + self.m * self.n) * elem_bytes
        speed = min(1.0, max(1, min(self.k, self.n)) / _GEMM_FULL_SPEED_DIM)
        return max(self.flops / speed, traffic * balance)


def _moves(shape: Sequence[int], order: Sequence[int]) -> bool:
    """True if permuting ``shape`` by ``order`` needs a copy (non-unit dims change order)."""
    kept = [d for d in order if shape[d] != 1]
    return kept != sorted(kept)


def weight_copy(path: str, rank: int, shape_a: tuple[int, int], shape_b: tuple[int, int]) -> int:
    """Elements a call of ``path`` copies from the factors when nothing is cached: the second GEMM operand of a
    Kronecker path when it is not a view of its factor (:func:`path_operands`), the built weight for "dense"."""
    (m1, n1), (m2, n2), r = shape_a, shape_b, rank
    if path == "dense":
        return m1 * m2 * n1 * n2
    if path == "b_first":  # (r, m1, n1) as (r·n1, m1): a view when a side is 1
        return r * m1 * n1 if min(r, m1, n1) > 1 else 0
    return r * m2 * n2 if min(r, m2, n2) > 1 else 0


def path_ops(path: str, tokens: int, rank: int, shape_a: tuple[int, int], shape_b: tuple[int, int],
             cached: bool = False) -> list[Op]:
    """The GEMMs and copies of ``path`` for ``tokens`` input rows (mirrors :func:`kron_matmul`); ``cached``: the
    layer keeps its weights laid out between calls (eval mode, no autograd), else a call builds or copies them."""
    (m1, n1), (m2, n2), r, t = shape_a, shape_b, rank, tokens
    if path == "dense":
        build = [] if cached else [Op(m1 * n1, r, m2 * n2), Op(weight_copy(path, r, shape_a, shape_b))]
        return build + [Op(t, n1 * n2, m1 * m2)]
    copy = 0 if cached else weight_copy(path, r, shape_a, shape_b)
    if path == "b_first":
        ops = [Op(copy)] if copy else []
        ops.append(Op(t * n1, n2, r * m2))
        if _moves((t, n1, r, m2), (0, 3, 2, 1)):
            ops.append(Op(t * n1 * r * m2))
        ops.append(Op(t * m2, r * n1, m1))
        if _moves((t, m2, m1), (0, 2, 1)):
            ops.append(Op(t * m1 * m2))
        return ops
    if path == "a_first":
        ops = [Op(copy)] if copy else []
        if _moves((t, n1, n2), (0, 2, 1)):
            ops.append(Op(t * n1 * n2))
        ops.append(Op(t * n2, n1, r * m1))
        if _moves((t, n2, r, m1), (0, 3, 2, 1)):
            ops.append(Op(t * n2 * r * m1))
        ops.append(Op(t * m1, r * n2, m2))
        return ops
    raise KronfactError(f"path must be one of {PATHS}, got {path!r}")


def path_cost(path: str, tokens: int, rank: int, shape_a: tuple[int, int], shape_b: tuple[int, int],
              *, device_type: str = "cpu", elem_bytes: int = 4, cached: bool = False) -> float:
    """Estimated time of ``path`` in FLOP units: its ops' roofline costs and fixed costs plus, for every
    intermediate it allocates (all op outputs but the last), the device's allocation penalty."""
    balance, alloc, per_op = MACHINE.get(device_type, MACHINE["cuda"])
    ops = path_ops(path, tokens, rank, shape_a, shape_b, cached)
    fresh = sum(op.out_elems for op in ops[:-1]) * elem_bytes
    return sum(op.cost(balance, elem_bytes) + per_op for op in ops) + alloc * fresh * balance


@functools.lru_cache(maxsize=4096)
def plan(tokens: int, rank: int, shape_a: tuple[int, int], shape_b: tuple[int, int], *,
         device_type: str = "cpu", elem_bytes: int = 4, cached: bool = False) -> str:
    """The cheapest of ``PATHS`` under :func:`path_cost` (dense wins ties); cached per arguments. Plain
    comparisons, no ``min(key=)``: torch.compile traces it with a symbolic ``tokens`` (dynamic shapes)."""
    best, best_cost = PATHS[0], None
    for path in PATHS:
        cost = path_cost(path, tokens, rank, shape_a, shape_b, device_type=device_type, elem_bytes=elem_bytes,
                         cached=cached)
        if best_cost is None or cost < best_cost:
            best, best_cost = path, cost
    return best


def _product(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """(m, k) @ (k, n), plus ``bias`` (p,) added to every p consecutive outputs (row-major) if given.

    A broadcast product when k == 1 (BLAS is slow at rank-1 GEMMs), fused with the bias — in eager mode
    only: Inductor fuses a broadcast product with what follows (e.g. the MLP's activation) into a loop
    over the product's inner dimension, scalar when that is small (a Krony-PT B of 2×1: 10× slower than
    the GEMM it replaces), while a GEMM stays a library call and leaves the activation vectorized."""
    broadcast = x.shape[1] == 1 and not torch.compiler.is_compiling()
    if bias is None:
        return x * w if broadcast else torch.mm(x, w)
    m, n, p = x.shape[0], w.shape[1], bias.numel()
    if p == n:
        return torch.addcmul(bias, x, w) if broadcast else torch.addmm(bias, x, w)
    if broadcast:  # (m/(p/n), p/n, 1)·(1, n) + (p/n, n): broadcasting does the rest
        return torch.addcmul(bias.view(p // n, n), x.view(-1, p // n, 1), w).view(m, n)
    out = torch.mm(x, w)
    out.view(-1, p).add_(bias)
    return out


class _MatMul(torch.autograd.Function):
    """x (m, k) @ w (k, n) [+ bias, see :func:`_product`] whose backward GEMMs, gx = g·wᵀ and
    gw = xᵀ·g, also become broadcast products when their inner size is 1 — and never materialise
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


def _grad_mm(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """:func:`_product` under autograd: through :class:`_MatMul` when a GEMM of the forward or the backward has
    a size-1 dimension, or the bias spans several output rows (added in place inside, where autograd does not see
    a view: out of place it is a fresh output-sized tensor, in place through a view a full copy in the backward);
    else plain autograd ops (no Python in the backward)."""
    p = None if bias is None else bias.numel()
    if (1 in (x.shape[0], x.shape[1], w.shape[1]) or p not in (None, w.shape[1])) \
            and not torch.compiler.is_compiling():
        return _MatMul.apply(x, w, bias)
    if bias is None:
        return x @ w
    return torch.addmm(bias, x, w)  # traced, kron_matmul adds a several-row bias to its output's final shape


# Under torch.compile, a transposing copy of the layer's input or output with a side below this is kept
# a library call (:func:`_transposed`): Inductor would fuse it with the neighbouring elementwise ops (the MLP's
# activation) into a loop over that small side, scalar — 5–10× slower than the copy and the activation apart.
_FUSED_TRANSPOSE_MIN_DIM = 16


# kronfact's operators (kronfact::transposed here, kronfact::cached_call in layer.py), defined directly:
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


def _transposed(x: Tensor, t: int, rows: int, cols: int, shape: Sequence[int]) -> Tensor:
    """x (t blocks of rows·cols elements) with every block transposed to (cols, rows), reshaped to ``shape``:
    a copy when both sides exceed 1."""
    if min(rows, cols) == 1:
        return x.reshape(shape)
    if torch.compiler.is_compiling() and min(rows, cols) < _FUSED_TRANSPOSE_MIN_DIM:
        return _transposed_copy(x, rows, cols).reshape(shape)
    return x.reshape(t, rows, cols).transpose(1, 2).reshape(shape)


def _reversed(y: Tensor, t: int, p: int, r: int, q: int) -> Tensor:
    """y (t, p, r, q) with its last three sides reversed, as (t·q, r·p): a copy unless at most one exceeds 1."""
    if (p > 1) + (r > 1) + (q > 1) <= 1:
        return y.reshape(t * q, r * p)
    return y.reshape(t, p, r, q).permute(0, 3, 2, 1).reshape(t * q, r * p)


def _low_rank(x: Tensor, v: Tensor, u: Tensor, bias: Tensor | None) -> Tensor:
    """x·(u·v)ᵀ + bias as two GEMMs, the bias fused into the second: v (r, in), u (r, out)."""
    return F.linear(F.linear(x, v), u.T, bias)


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
    if path not in PATHS:
        raise KronfactError(f"path must be one of {PATHS}, got {path!r}")
    if path == "b_first" and n1 == 1 and m2 == 1:  # plain low rank: A (out, 1) columns, B (1, in) rows
        return _low_rank(x, b.view(r, n2), a.view(r, m1), bias)
    if path == "a_first" and m1 == 1 and n2 == 1:  # plain low rank, mirrored: A (1, in) rows, B (out, 1) columns
        return _low_rank(x, a.view(r, n1), b.view(r, m2), bias)
    lead = x.shape[:-1]
    t = x.numel() // (n1 * n2) if n1 * n2 else 0
    mm = _grad_mm if grad else _product
    w1, w2 = operands if operands is not None and not autocast else path_operands(a, b, path)
    # Traced, a bias spanning several rows of the last GEMM's output is added to the output's final shape instead:
    # through the (t·m1, m2) view, Inductor indexes it by floor-division and modulo of a symbolic token count, a
    # scalar loop (tiny's Krony-PT 25% MLP at 8 tokens after 1: 3-4× slower than static shapes).
    traced = torch.compiler.is_compiling()
    if path == "b_first":
        y = mm(x.reshape(t * n1, n2), w1)                                         # (t·n1, r·m2)
        y = _reversed(y, t, n1, r, m2)                                            # (t·m2, r·n1)
        fuse = m2 == 1 or (m1 == 1 and not traced)  # no transpose of the output: the bias goes into the GEMM
        y = mm(y, w2, bias if fuse else None)                                     # (t·m2, m1)
        y = _transposed(y, t, m2, m1, (*lead, m1 * m2))
        return y if fuse or bias is None else y + bias
    y = _transposed(x, t, n1, n2, (t * n2, n1))
    y = mm(y, w1)                                                                 # (t·n2, r·m1)
    y = _reversed(y, t, n2, r, m1)                                                # (t·m1, r·n2)
    late = traced and m1 > 1 and bias is not None
    y = mm(y, w2, None if late else bias).reshape(*lead, m1 * m2)
    return y + bias if late else y


def path_operands(a: Tensor, b: Tensor, path: str) -> tuple[Tensor, Tensor]:
    """The weight matrices of the two GEMMs of ``path`` ("b_first" or "a_first") for a (r, m1, n1), b (r, m2,
    n2): b_first (n2, r·m2) and (r·n1, m1), a_first (n1, r·m1) and (r·n2, m2). The first is a view, the
    second a copy when both its sides exceed 1 — what an inference caller keeps between calls."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    if path == "b_first":
        return b.reshape(r * m2, n2).T, a.permute(0, 2, 1).reshape(r * n1, m1)
    return a.reshape(r * m1, n1).T, b.permute(0, 2, 1).reshape(r * n2, m2)
