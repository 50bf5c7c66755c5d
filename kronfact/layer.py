"""KronLinear: a linear layer whose weight is Σ_{i<r} A_i ⊗ B_i, applied without building it.

For one input row x (n1·n2,) reshaped to X (n1, n2): (A ⊗ B)·x = vec(A·X·Bᵀ). With the batch folded
into large GEMMs there are two orders (B-first: X·Bᵀ then A·(…); A-first: A·X then (…)·Bᵀ) besides
materialise-then-GEMM. :func:`plan` picks the cheapest for a layer and a number of tokens with a
roofline cost model that counts the FLOPs and the bytes of every GEMM and every layout copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kron import KronFactors, check_shape_a, decompose, kron_sum, max_rank

Path = Literal["dense", "b_first", "a_first"]
PATHS: tuple[str, ...] = ("dense", "b_first", "a_first")
# The layer type a KronLinear replaced, and merges back to: nn.Linear, or transformers' Conv1D
# (weight stored (in, out)). The KronLinear itself always holds the nn.Linear orientation.
ORIENTATIONS: tuple[str, ...] = ("linear", "conv1d")

# Per device type: machine balance (FLOPs per byte of memory traffic: ~200 GFLOP/s fp32 GEMM over
# ~25 GB/s on a 2-core AVX-512 CPU, near 50 on a datacenter GPU) and the extra cost of a freshly
# allocated intermediate, in multiples of writing it once. On CPU, glibc serves blocks above 32 MB
# with mmap, and first-touch page faults cost ~6× the write itself (measured here; a caching
# malloc such as jemalloc or MALLOC_MMAP_THRESHOLD_ removes it); CUDA's caching allocator has none.
MACHINE = {"cpu": (8.0, 6.0), "cuda": (50.0, 0.0)}
# GEMMs with an inner or outer dimension below this run below peak: charged proportionally.
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
        speed = min(1.0, max(1, min(self.m, self.k, self.n)) / _GEMM_FULL_SPEED_DIM)
        return max(self.flops / speed, traffic * balance)


def _moves(shape: Sequence[int], order: Sequence[int]) -> bool:
    """True if permuting ``shape`` by ``order`` needs a copy (non-unit dims change order)."""
    kept = [d for d in order if shape[d] != 1]
    return kept != sorted(kept)


def path_ops(path: str, tokens: int, rank: int, shape_a: tuple[int, int], shape_b: tuple[int, int],
             cached_dense: bool = False) -> list[Op]:
    """The GEMMs and copies of ``path`` for ``tokens`` input rows (mirrors :func:`kron_matmul`)."""
    (m1, n1), (m2, n2), r, t = shape_a, shape_b, rank, tokens
    if path == "dense":
        build = [] if cached_dense else [Op(m1 * n1, r, m2 * n2), Op(m1 * m2 * n1 * n2)]
        return build + [Op(t, n1 * n2, m1 * m2)]
    if path == "b_first":
        ops = [Op(t * n1, n2, r * m2)]
        if _moves((t, n1, r, m2), (0, 3, 2, 1)):
            ops.append(Op(t * n1 * r * m2))
        ops.append(Op(t * m2, r * n1, m1))
        if _moves((t, m2, m1), (0, 2, 1)):
            ops.append(Op(t * m1 * m2))
        return ops
    if path == "a_first":
        ops = [Op(t * n1 * n2)] if _moves((t, n1, n2), (0, 2, 1)) else []
        ops.append(Op(t * n2, n1, r * m1))
        if _moves((t, n2, r, m1), (0, 3, 2, 1)):
            ops.append(Op(t * n2 * r * m1))
        ops.append(Op(t * m1, r * n2, m2))
        return ops
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def path_cost(path: str, tokens: int, rank: int, shape_a: tuple[int, int], shape_b: tuple[int, int],
              *, device_type: str = "cpu", elem_bytes: int = 4, cached_dense: bool = False) -> float:
    """Estimated time of ``path`` in FLOP units: its ops' roofline costs plus, for every
    intermediate it allocates (all op outputs but the last), the device's allocation penalty."""
    balance, alloc = MACHINE.get(device_type, MACHINE["cuda"])
    ops = path_ops(path, tokens, rank, shape_a, shape_b, cached_dense)
    fresh = sum(op.out_elems for op in ops[:-1]) * elem_bytes
    return sum(op.cost(balance, elem_bytes) for op in ops) + alloc * fresh * balance


def plan(tokens: int, rank: int, shape_a: tuple[int, int], shape_b: tuple[int, int], *,
         device_type: str = "cpu", elem_bytes: int = 4, cached_dense: bool = False) -> str:
    """The cheapest of ``PATHS`` under :func:`path_cost` (dense wins ties)."""
    return min(PATHS, key=lambda p: path_cost(p, tokens, rank, shape_a, shape_b, device_type=device_type,
                                                elem_bytes=elem_bytes, cached_dense=cached_dense))


def _product(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """(m, k) @ (k, n), plus ``bias`` (p,) added to every p consecutive outputs (row-major) if given.

    A broadcast product when k == 1 (BLAS is slow at rank-1 GEMMs), fused with the bias."""
    if bias is None:
        return x * w if x.shape[1] == 1 else x @ w
    m, n, p = x.shape[0], w.shape[1], bias.numel()
    if x.shape[1] == 1:
        return torch.addcmul(bias.view(1, p // n, n), x.view(-1, p // n, 1), w.view(1, 1, n)).view(m, n)
    out = x @ w
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
        ctx.bias_size = None if bias is None else bias.numel()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, w = ctx.saved_tensors
        gx = _product(g, w.T) if ctx.needs_input_grad[0] else None
        gw = _product(x.T, g) if ctx.needs_input_grad[1] else None
        gb = g.reshape(-1, ctx.bias_size).sum(0) if ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _mm(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """(m, k) @ (k, n) [+ bias] for the Kronecker paths (see :class:`_MatMul`)."""
    return _MatMul.apply(x, w, bias)


def kron_matmul(x: Tensor, a: Tensor, b: Tensor, path: str, bias: Tensor | None = None) -> Tensor:
    """x (t, n1·n2) → x·(Σ_i A_i ⊗ B_i)ᵀ + bias of shape (t, m1·m2), by ``path``; a (r, m1, n1),
    b (r, m2, n2), bias (m1·m2,) or None."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    t = x.shape[0]
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:  # as autocast's GEMMs would cast,
        # so that the backward sees one dtype (autocast leaves float64 alone)
        dtype = torch.get_autocast_dtype(x.device.type)
        x, a, b = x.to(dtype), a.to(dtype), b.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if path == "dense":
        return F.linear(x, kron_sum(a, b), bias)
    if path == "b_first":
        y = _mm(x.reshape(t * n1, n2), b.reshape(r * m2, n2).T)                   # (t·n1, r·m2)
        y = y.reshape(t, n1, r, m2).permute(0, 3, 2, 1).reshape(t * m2, r * n1)   # (t·m2, r·n1)
        y = _mm(y, a.permute(0, 2, 1).reshape(r * n1, m1))                        # (t·m2, m1)
        y = y.reshape(t, m2, m1).transpose(1, 2).reshape(t, m1 * m2)
        return y if bias is None else y + bias
    if path == "a_first":
        y = x.reshape(t, n1, n2).transpose(1, 2).reshape(t * n2, n1)
        y = _mm(y, a.reshape(r * m1, n1).T)                                       # (t·n2, r·m1)
        y = y.reshape(t, n2, r, m1).permute(0, 3, 2, 1).reshape(t * m1, r * n2)   # (t·m1, r·n2)
        return _mm(y, b.permute(0, 2, 1).reshape(r * n2, m2), bias).reshape(t, m1 * m2)
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def permute_weight(k: Tensor, in_perm: Tensor | None, out_perm: Tensor | None) -> Tensor:
    """The weight of a layer computing y = (x[..., in_perm]·kᵀ)[..., out_perm]: k (out, in) with rows
    gathered by ``out_perm`` and columns scattered by ``in_perm`` (None: that side unpermuted)."""
    if out_perm is not None:
        k = k.index_select(0, out_perm)
    if in_perm is not None:
        k = torch.empty_like(k).index_copy(1, in_perm, k)
    return k


class KronLinear(nn.Module):
    """y = x·Wᵀ + bias with W = Σ_{i<rank} a[i] ⊗ b[i], never materialised unless that is cheapest.

    Parameters: ``a`` (rank, m1, n1), ``b`` (rank, m2, n2), ``bias`` (out_features,) or None, where
    shape_a = (m1, n1), out_features = m1·m2, in_features = n1·n2. Input (..., in_features) →
    output (..., out_features), in the parameters' dtype and on their device.

    ``path`` = "auto" (default) picks dense, B-first or A-first per call from the number of tokens
    (:func:`plan`); a fixed path may be forced for benchmarks. In eval mode without autograd the
    dense weight is cached while the factors are unchanged.

    Optional permutations (buffers, None by default; set by :meth:`set_permutations`): ``in_perm``
    (in_features,) and ``out_perm`` (out_features,) int64 index vectors, both applied as gathers,

        y = (x[..., in_perm] · Kᵀ)[..., out_perm] + bias,    K = Σ_i a[i] ⊗ b[i],

    so the layer's weight is W̃ = K[out_perm][:, in_perm⁻¹], i.e. W̃[o, in_perm[j]] = K[out_perm[o], j]
    (:meth:`to_dense`). A permutation search (kronfact.permute) fits K to W[out_perm⁻¹][:, in_perm].
    """

    def __init__(self, in_features: int, out_features: int, shape_a: Sequence[int], rank: int = 1,
                 bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, path: str = "auto", orientation: str = "linear") -> None:
        super().__init__()
        if orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        m1, n1 = check_shape_a(out_features, in_features, shape_a)
        m2, n2 = out_features // m1, in_features // n1
        limit = max_rank((m1, n1), (m2, n2))
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
            raise ValueError(f"rank must be an int in [1, {limit}] for shape_a={(m1, n1)}, "
                             f"shape_b={(m2, n2)}; got {rank!r}")
        if path != "auto" and path not in PATHS:
            raise ValueError(f"path must be 'auto' or one of {PATHS}, got {path!r}")
        self.in_features, self.out_features, self.rank, self.path = in_features, out_features, rank, path
        self.orientation = orientation
        kw = {"device": device, "dtype": dtype}
        self.a = nn.Parameter(torch.empty(rank, m1, n1, **kw))
        self.b = nn.Parameter(torch.empty(rank, m2, n2, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.register_buffer("in_perm", None)
        self.register_buffer("out_perm", None)
        self._dense_cache: tuple[tuple, Tensor] | None = None
        self.reset_parameters()

    @property
    def shape_a(self) -> tuple[int, int]:
        return (self.a.shape[1], self.a.shape[2])

    @property
    def shape_b(self) -> tuple[int, int]:
        return (self.b.shape[1], self.b.shape[2])

    def reset_parameters(self) -> None:
        """Random factors whose product has nn.Linear's weight std (1/√(3·in)); nn.Linear's bias init."""
        bound = 1 / math.sqrt(self.in_features)
        scale = (bound**2 / 3 / self.rank) ** 0.25
        with torch.no_grad():
            self.a.normal_(0, scale)
            self.b.normal_(0, scale)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)
        self._dense_cache = None

    def _check_perm(self, perm: Tensor | None, size: int, what: str) -> Tensor | None:
        if perm is None:
            return None
        if (not isinstance(perm, Tensor) or perm.dim() != 1 or perm.shape[0] != size
                or perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool):
            shape = tuple(perm.shape) if isinstance(perm, Tensor) else type(perm).__name__
            raise ValueError(f"{what} must be an integer tensor of shape ({size},), got {shape}")
        perm = perm.detach().to(device=self.a.device, dtype=torch.long)
        if not torch.equal(torch.sort(perm).values, torch.arange(size, device=perm.device)):
            raise ValueError(f"{what} is not a permutation of 0…{size - 1} (repeated or out-of-range indices)")
        return perm.clone()

    def set_permutations(self, in_perm: Tensor | None = None, out_perm: Tensor | None = None) -> KronLinear:
        """Set (or, with None, remove) the gather indices ``in_perm`` (in_features,) and ``out_perm``
        (out_features,); see the class docstring. They are buffers: saved in ``state_dict``, moved by
        ``.to()``. Returns ``self``."""
        in_perm = self._check_perm(in_perm, self.in_features, "in_perm")
        out_perm = self._check_perm(out_perm, self.out_features, "out_perm")
        self.in_perm, self.out_perm = in_perm, out_perm
        self._dense_cache = None
        return self

    @classmethod
    def from_factors(cls, factors: KronFactors, bias: Tensor | None = None, path: str = "auto",
                     orientation: str = "linear", in_perm: Tensor | None = None,
                     out_perm: Tensor | None = None) -> KronLinear:
        """A layer holding ``factors`` (copied), ``bias`` (out_features,) if given, and the optional
        permutations ``in_perm`` (in_features,), ``out_perm`` (out_features,) (:meth:`set_permutations`)."""
        (m1, n1), (m2, n2) = factors.shape_a, factors.shape_b
        layer = cls(n1 * n2, m1 * m2, (m1, n1), factors.rank, bias=bias is not None,
                    device=factors.a.device, dtype=factors.a.dtype, path=path, orientation=orientation)
        with torch.no_grad():
            layer.a.copy_(factors.a)
            layer.b.copy_(factors.b)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer.set_permutations(in_perm, out_perm)

    @classmethod
    def from_linear(cls, linear: nn.Linear, shape_a: Sequence[int], rank: int = 1, init: str = "vanloan",
                    **decompose_kwargs) -> KronLinear:
        """Factorize ``linear.weight`` with :func:`kronfact.decompose` and keep its bias."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        factors = decompose(linear.weight, shape_a, rank, init, **decompose_kwargs)
        return cls.from_factors(factors, None if linear.bias is None else linear.bias.detach())

    def to_dense(self) -> Tensor:
        """The layer's weight W̃, shape (out_features, in_features) (differentiable): Σ_i a_i ⊗ b_i,
        with rows gathered by ``out_perm`` and columns scattered by ``in_perm`` when they are set."""
        return permute_weight(kron_sum(self.a, self.b), self.in_perm, self.out_perm)

    def to_linear(self) -> nn.Linear:
        """An nn.Linear computing the same function, holding the dense product."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.a.device, dtype=self.a.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def choose_path(self, tokens: int, cached_dense: bool = False) -> str:
        """The path :meth:`forward` takes for ``tokens`` rows."""
        if self.path != "auto":
            return self.path
        return plan(tokens, self.rank, self.shape_a, self.shape_b, device_type=self.a.device.type,
                    elem_bytes=self.a.element_size(), cached_dense=cached_dense)

    def _cached_dense(self) -> Tensor:
        key = (self.a._version, self.b._version, self.a.data_ptr(), self.b.data_ptr(), self.a.dtype,
               *((p._version, p.data_ptr()) if p is not None else None for p in (self.in_perm, self.out_perm)))
        if self._dense_cache is None or self._dense_cache[0] != key:
            self._dense_cache = (key, self.to_dense())
        return self._dense_cache[1]

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"KronLinear expects inputs (..., {self.in_features}), got {tuple(x.shape)}")
        if x.dtype != self.a.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"KronLinear holds {self.a.dtype} parameters but got a {x.dtype} input; cast "
                             f"one to the other (e.g. layer.to({x.dtype})) or run under torch.autocast")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        cacheable = (not self.training and not torch.is_grad_enabled()
                     and not torch.compiler.is_compiling())
        path = self.choose_path(x2.shape[0], cached_dense=cacheable)
        if path == "dense":
            weight = self._cached_dense() if cacheable else self.to_dense()
            return F.linear(x, weight, self.bias)
        if self.in_perm is not None:
            x2 = x2.index_select(1, self.in_perm)
        if self.out_perm is None:
            y = kron_matmul(x2, self.a, self.b, path, self.bias)
        else:  # the bias is in output order: add it after the gather
            y = kron_matmul(x2, self.a, self.b, path).index_select(1, self.out_perm)
            y = y if self.bias is None else y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"shape_a={self.shape_a}, shape_b={self.shape_b}, rank={self.rank}, "
                f"bias={self.bias is not None}" + ("" if self.path == "auto" else f", path={self.path!r}")
                + ("" if self.orientation == "linear" else f", orientation={self.orientation!r}")
                + "".join(f", {name}=True" for name in ("in_perm", "out_perm") if getattr(self, name) is not None))
