"""KronLinear: a linear layer whose weight is Σ_{i<r} A_i ⊗ B_i, applied without building it.

How a call runs: the path (dense, B-first or A-first) is picked by :mod:`kronfact.plans`' cost model and run
by :mod:`kronfact.paths`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compiled import LAYERS, cached_call
from .errors import KronfactError
from .kron import KronFactors, check_shape_a, decompose, kron_sum, max_rank, permute_weight
from .paths import kron_matmul, path_operands, steps
from .plans import PATHS, plan

# The layer type a KronLinear replaced, and merges back to: nn.Linear, or transformers' Conv1D
# (weight stored (in, out)). The KronLinear itself always holds the nn.Linear orientation.
ORIENTATIONS: tuple[str, ...] = ("linear", "conv1d")

# The memory order, from the slowest dimension to the fastest, in which a (r, m1, n1) and b (r, m2, n2) make every GEMM
# operand of both Kronecker paths (:func:`kronfact.paths.path_operands`) a row-major view: a factor stored as (n, r, m)
# reads as (n, r·m), a first GEMM's operand, and as (n·r, m), a second's.
_LAYOUT = (2, 0, 1)
# Input sizes for which a layer keeps its plans and its prepared inference calls, the earliest added dropped first: a
# server that sees every prompt length stays bounded, and a rebuilt entry is cheap (plans and steps are cached too).
_SIZES_KEPT = 256


class KronLinear(nn.Module):
    """y = x·Wᵀ + bias with W = Σ_{i<rank} a[i] ⊗ b[i], never materialised unless that is cheapest.

    Parameters: ``a`` (rank, m1, n1), ``b`` (rank, m2, n2), ``bias`` (out_features,) or None, where
    shape_a = (m1, n1), out_features = m1·m2, in_features = n1·n2. Input (..., in_features) →
    output (..., out_features), in the parameters' dtype and on their device.

    ``path`` = "auto" (default) picks dense, B-first or A-first per call from the number of tokens
    (:func:`kronfact.plans.plan`); a fixed path may be forced for benchmarks. In eval mode without autograd the
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
            raise KronfactError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        m1, n1 = check_shape_a(out_features, in_features, shape_a)
        m2, n2 = out_features // m1, in_features // n1
        limit = max_rank((m1, n1), (m2, n2))
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
            raise KronfactError(f"rank must be an int in [1, {limit}] for shape_a={(m1, n1)}, "
                                f"shape_b={(m2, n2)}; got {rank!r}")
        if path != "auto" and path not in PATHS:
            raise KronfactError(f"path must be 'auto' or one of {PATHS}, got {path!r}")
        self.in_features, self.out_features, self.rank, self.path = in_features, out_features, rank, path
        self.orientation = orientation
        kw = {"device": device, "dtype": dtype}
        self.a = nn.Parameter(torch.empty(rank, m1, n1, **kw))
        self.b = nn.Parameter(torch.empty(rank, m2, n2, **kw))
        # a key even if None, so that forward tells a missing bias from one replaced by an attribute (torch's prune)
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **kw)) if bias else None)
        self.register_buffer("in_perm", None)
        self.register_buffer("out_perm", None)
        self._dense_cache: tuple[tuple, Tensor, tuple] | None = None
        self._operand_cache: tuple[tuple, tuple[Tensor, Tensor], tuple] | None = None  # eval mode, no autograd
        self._plans: dict[tuple, str] = {}  # (tokens, input dtype, device, dense cache usable) → path, for "auto"
        self._inference: tuple[tuple, dict, tuple] | None = None  # see _infer
        LAYERS[id(self)] = self
        self.reset_parameters()

    def __getstate__(self) -> dict:  # copy.deepcopy, pickle: _infer's cache holds functions, rebuilt on demand
        return {**super().__getstate__(), "_inference": None}

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy, pickle: a new object, registered too
        super().__setstate__(state)
        self.__dict__.setdefault("_inference", None)  # pickled before the cache existed
        LAYERS[id(self)] = self

    @property
    def shape_a(self) -> tuple[int, int]:
        return (self.a.shape[1], self.a.shape[2])

    @property
    def shape_b(self) -> tuple[int, int]:
        return (self.b.shape[1], self.b.shape[2])

    @property
    def _low_rank(self) -> bool:
        """Plain low rank (A (out, 1) ⊗ B (1, in), or the mirror): two GEMMs, no layout work — traced well."""
        (m1, n1), (m2, n2) = self.shape_a, self.shape_b
        return (n1 == 1 and m2 == 1) or (m1 == 1 and n2 == 1)

    def reset_parameters(self) -> None:
        """Random factors whose product has nn.Linear's weight std (1/√(3·in)); nn.Linear's bias init."""
        bound = 1 / math.sqrt(self.in_features)
        scale = (bound**2 / 3 / self.rank) ** 0.25
        with torch.no_grad():
            self.a.normal_(0, scale)
            self.b.normal_(0, scale)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)
        self._dense_cache = self._operand_cache = self._inference = None

    def _check_perm(self, perm: Tensor | None, size: int, what: str) -> Tensor | None:
        if perm is None:
            return None
        if (not isinstance(perm, Tensor) or perm.dim() != 1 or perm.shape[0] != size
                or perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool):
            shape = tuple(perm.shape) if isinstance(perm, Tensor) else type(perm).__name__
            raise KronfactError(f"{what} must be an integer tensor of shape ({size},), got {shape}")
        perm = perm.detach().to(torch.long)
        if not torch.equal(torch.sort(perm).values, torch.arange(size, device=perm.device)):
            raise KronfactError(f"{what} is not a permutation of 0…{size - 1} (repeated or out-of-range indices)")
        return perm.to(self.a.device, copy=True)

    def set_permutations(self, in_perm: Tensor | None = None, out_perm: Tensor | None = None) -> KronLinear:
        """Set (or, with None, remove) the gather indices ``in_perm`` (in_features,) and ``out_perm``
        (out_features,); see the class docstring. They are buffers: saved in ``state_dict``, moved by
        ``.to()``. Returns ``self``."""
        in_perm = self._check_perm(in_perm, self.in_features, "in_perm")
        out_perm = self._check_perm(out_perm, self.out_features, "out_perm")
        self.in_perm, self.out_perm = in_perm, out_perm
        self._dense_cache = self._operand_cache = self._inference = None
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
            raise KronfactError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
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

    def to_module(self) -> nn.Module:
        """The layer type this one replaced, holding the dense product: an nn.Linear, or transformers'
        Conv1D (weight stored (in, out), a zero bias when there was none) for orientation "conv1d".
        Device, dtype, train mode and requires_grad follow this layer. :func:`kronfact.merge` uses it."""
        if self.orientation == "linear":
            dense = self.to_linear()
        else:
            from transformers.pytorch_utils import Conv1D  # transformers: only when a Conv1D was replaced

            with torch.device(self.a.device):
                dense = Conv1D(self.out_features, self.in_features).to(self.a.dtype)
            with torch.no_grad():
                dense.weight.copy_(self.to_dense().T)
                if self.bias is None:
                    dense.bias.zero_()
                else:
                    dense.bias.copy_(self.bias)
        return dense.train(self.training).requires_grad_(self.a.requires_grad)

    def train(self, mode: bool = True) -> KronLinear:
        """nn.Module.train; eval mode also lays the factors out for inference (:meth:`lay_out`), training mode stores
        them contiguous again, as built: the strides DDP's gradient buckets were made for, and what safetensors'
        ``save_file`` accepts (a training step timed the same on either layout)."""
        super().train(mode)
        if not mode:
            return self.lay_out()
        with torch.no_grad():
            for name in ("a", "b"):
                p = self._parameters.get(name)  # None: replaced by an attribute (torch's prune), rebuilt per call
                if p is not None and not p.is_contiguous():
                    p.data = p.contiguous()
        return self

    def lay_out(self) -> KronLinear:
        """Store ``a`` and ``b`` in the memory order in which both Kronecker paths read them: every GEMM operand becomes
        a row-major (k, n) view, no copy is cached, and MKL reads them faster at a few rows than the transposed views
        of contiguous factors (DRAM-resident, 1024×1024 at 8 rows: 287 against 495 µs). Values, shapes, dtypes and
        devices are unchanged; only strides. :meth:`train` calls it on the way to eval mode; nothing to do for plain
        low rank. Returns ``self``.

        >>> layer = KronLinear(8, 6, (3, 4), rank=2).eval()
        >>> layer.a.shape, layer.a.stride()  # (rank, m1, n1), stored as (n1, rank, m1)
        (torch.Size([2, 3, 4]), (3, 1, 6))
        """
        if self._low_rank or self._laid_out(self.a, self.b):
            return self
        with torch.no_grad():
            for name in ("a", "b"):  # a laid-out one: contiguous() is a no-op
                p = self._parameters.get(name)
                if p is None:  # replaced by an attribute (torch.nn.utils.prune), rebuilt per call
                    continue
                p.data = p.permute(_LAYOUT).contiguous().permute(*(_LAYOUT.index(d) for d in range(3)))
        return self

    def choose_path(self, tokens: int, cached: bool = False, traced: bool | None = None) -> str:
        """The path :meth:`forward` takes for ``tokens`` rows (:func:`kronfact.plans.plan`); ``traced``: in a compiled
        graph (default: whether torch.compile is tracing now)."""
        if self.path != "auto":
            return self.path
        compiling = torch.compiler.is_compiling()
        planner = plan.__wrapped__ if compiling else plan  # dynamo traces through, uncached
        return planner(tokens, self.rank, self.shape_a, self.shape_b, device_type=self.a.device.type,
                       elem_bytes=self.a.element_size(), cached=cached, traced=compiling if traced is None else traced,
                       bias=self.bias is not None)

    @staticmethod
    def _values_key(*tensors: Tensor | None) -> tuple:
        """Changes whenever one of ``tensors`` is modified in place, replaced, or cast: a cache's validity."""
        return tuple(None if t is None else (t._version, t.data_ptr(), t.dtype) for t in tensors)

    def _cached_dense(self, a: Tensor, b: Tensor, in_perm: Tensor | None, out_perm: Tensor | None) -> Tensor:
        key = self._values_key(a, b, in_perm, out_perm)
        cache = self._dense_cache
        if cache is None or cache[0] != key:
            # built as Wᵀ = Σ aᵢᵀ ⊗ bᵢᵀ, (in, out) row-major: F.linear then runs x·Wᵀ as a plain GEMM, which MKL does
            # up to 2× faster at 4–64 rows than against nn.Linear's (out, in) layout
            wt = permute_weight(kron_sum(a.mT, b.mT), in_perm, out_perm, transposed=True)
            cache = self._dense_cache = (key, wt.T, _pinned(a, b, in_perm, out_perm))
        return cache[1]

    def _cached_operands(self, a: Tensor, b: Tensor, path: str) -> tuple[Tensor, Tensor]:
        """The GEMM operands of ``path`` (:func:`kronfact.paths.path_operands`), laid out once per factor values."""
        key = (path, *self._values_key(a, b))
        cache = self._operand_cache
        if cache is None or cache[0] != key:
            cache = self._operand_cache = (key, path_operands(a, b, path), _pinned(a, b))
        return cache[1]

    def forward(self, x: Tensor) -> Tensor:
        try:  # plain tensors: read without nn.Module's attribute lookup (a decoded token's cost is mostly per call)
            if type(self) is not KronLinear:  # a subclass, e.g. a parametrization's, keeps its properties
                raise KeyError
            params, buffers = self._parameters, self._buffers
            a, b, bias, in_perm, out_perm = (params["a"], params["b"], params["bias"], buffers["in_perm"],
                                             buffers["out_perm"])
        except KeyError:  # or a parameter replaced by a plain attribute (torch.nn.utils.prune: a_orig · mask)
            a, b, bias, in_perm, out_perm = self.a, self.b, self.bias, self.in_perm, self.out_perm
        if x.shape[-1] != self.in_features:
            raise KronfactError(f"KronLinear expects inputs (..., {self.in_features}), got {tuple(x.shape)}")
        if x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            raise KronfactError(f"KronLinear holds {a.dtype} parameters but got a {x.dtype} input; cast "
                                f"one to the other (e.g. layer.to({x.dtype})) or run under torch.autocast")
        grad = torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad
                                            or (bias is not None and bias.requires_grad))
        compiling = torch.compiler.is_compiling()
        if not (grad or self.training or compiling) and in_perm is None and out_perm is None and not _autocast(x):
            return self._infer(x, a, b, bias)  # inference, the common case: first
        if compiling and not (grad or self.training or torch.is_autocast_enabled(x.device.type) or self._low_rank):
            path = self.choose_path(x.numel() // self.in_features, cached=True)
            if path == "dense" or not self._laid_out(a, b):
                return cached_call(x, a, b, bias, in_perm, out_perm, id(self))  # see kronfact.compiled
            # the path's GEMM operands are views of the factors (laid out by eval()): traced, as plain library calls
            return self._call(x, a, b, bias, in_perm, out_perm, False, False, True, path)
        cacheable = not (grad or self.training or compiling) and _keyable(a, b, in_perm, out_perm)
        return self._call(x, a, b, bias, in_perm, out_perm, grad, cacheable, compiling)

    @staticmethod
    def _laid_out(a: Tensor, b: Tensor) -> bool:
        """True if the paths' GEMM operands are row-major views of ``a`` and ``b`` (:meth:`lay_out`)."""
        return a.permute(_LAYOUT).is_contiguous() and b.permute(_LAYOUT).is_contiguous()

    def _call(self, x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None, in_perm: Tensor | None,
              out_perm: Tensor | None, grad: bool, cacheable: bool, compiling: bool, path: str | None = None) -> Tensor:
        """The layer on checked inputs; ``cacheable``: eval mode without autograd, not traced (caches usable);
        ``compiling``: being traced (plans are not cached); ``path``: the path to take, else the layer's plan."""
        path = path or self._plan(x, cacheable, compiling)
        if path == "dense":
            weight = self._cached_dense(a, b, in_perm, out_perm) if cacheable else \
                permute_weight(kron_sum(a, b), in_perm, out_perm)
            return F.linear(x, weight, bias)
        operands = self._cached_operands(a, b, path) if cacheable else None
        if in_perm is not None:
            x = x.index_select(-1, in_perm)
        if out_perm is None:
            return kron_matmul(x, a, b, path, bias, grad, operands)
        y = kron_matmul(x, a, b, path, grad=grad, operands=operands).index_select(-1, out_perm)  # bias: output order
        return y if bias is None else y + bias.to(y.dtype)

    def _plan(self, x: Tensor, cacheable: bool, compiling: bool) -> str:
        """The path for input ``x``: forced, or planned for its token count (cached unless traced)."""
        if self.path != "auto":
            return self.path
        if compiling:  # traced once per specialisation: no cache
            return self.choose_path(x.numel() // self.in_features)
        key = (x.numel() // self.in_features, x.dtype, x.device, cacheable)
        path = self._plans.get(key)
        return path if path is not None else _keep(self._plans, key, self.choose_path(key[0], cacheable))

    def _infer(self, x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
        """An inference call (eval mode, no autograd, not traced) without permutations or autocast. What it runs for
        the input's size — the planned path's steps (:func:`kronfact.paths.steps`) and GEMM operands, or the cached
        dense weight — is kept (for the :data:`_SIZES_KEPT` sizes prepared last) while the factors, the forced path and
        the bias's presence are unchanged, so that a decoded token runs little Python besides the path's tensor
        operations (tiny-gpt2's Krony-PT 50% MLP matrices inside a decode loop: 95–98 → 74–75 and 74–77 → 56–60 µs a
        call; the original's Conv1D, 63–69 and 67–73)."""
        try:
            values = (a._version, b._version, a.data_ptr(), b.data_ptr(), self.path, bias is None)
        except RuntimeError:  # factors that cannot key a cache (see _keyable): every call builds what it runs
            return self._call(x, a, b, bias, None, None, False, False, False)
        cache = self._inference
        if cache is None or cache[0] != values:  # every entry is stale: drop them with their tensors
            cache = self._inference = (values, {}, _pinned(a, b))
        size = x.numel()  # x has a's dtype (no autocast) and device (else its GEMMs raise)
        entry = cache[1].get(size)
        if entry is None:
            path = self._plan(x, True, False)
            if path == "dense":
                entry = (None, self._cached_dense(a, b, None, None), None)
            else:
                entry = (steps(path, size // self.in_features, self.rank, self.shape_a, self.shape_b,
                               None if bias is None else bias.numel(), False), *self._cached_operands(a, b, path))
            _keep(cache[1], size, entry)
        run, w1, w2 = entry
        return F.linear(x, w1, bias) if run is None else run(x, w1, w2, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"shape_a={self.shape_a}, shape_b={self.shape_b}, rank={self.rank}, "
                f"bias={self.bias is not None}" + ("" if self.path == "auto" else f", path={self.path!r}")
                + ("" if self.orientation == "linear" else f", orientation={self.orientation!r}")
                + "".join(f", {name}=True" for name in ("in_perm", "out_perm") if getattr(self, name) is not None))


def _keep(cache: dict, key, value):
    """``cache[key] = value``, first dropping the earliest added entry if ``cache`` holds :data:`_SIZES_KEPT`;
    ``value``. Two threads sharing a full cache may both drop the same entry: the second finds nothing to drop."""
    if len(cache) >= _SIZES_KEPT:
        cache.pop(next(iter(cache), None), None)
    cache[key] = value
    return value


def _pinned(*tensors: Tensor | None) -> tuple[Tensor, ...]:
    """Detached views of ``tensors``, kept beside a cache whose key names their data pointers: while the key lives,
    their memory cannot be freed and handed to another tensor of the same version (a factor passed anew to every
    call, e.g. by torch.func.functional_call or a parametrization), which the key would take for the cached one."""
    return tuple(t.detach() for t in tensors if t is not None)


def _keyable(*tensors: Tensor | None) -> bool:
    """True if every tensor can key a cache: it has a version counter (not made in inference mode) and storage (not a
    functorch transform's wrapper, e.g. torch.func.vmap over a layer's parameters)."""
    try:
        KronLinear._values_key(*tensors)
    except RuntimeError:
        return False
    return True


def _autocast(x: Tensor) -> bool:
    """True if autocast is on for ``x``'s device (the first test is a fraction of the second's cost)."""
    return torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(x.device.type)
