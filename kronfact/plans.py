"""Execution plans for x·(Σ_i A_i ⊗ B_i)ᵀ: the cost model that picks a path (:mod:`kronfact.paths` runs them).

For one input row x (n1·n2,) reshaped to X (n1, n2): (A ⊗ B)·x = vec(A·X·Bᵀ). With the batch folded
into large GEMMs there are two orders (B-first: X·Bᵀ then A·(…); A-first: A·X then (…)·Bᵀ) besides
materialise-then-GEMM. :func:`plan` picks the cheapest for a layer and a number of tokens with a
cost model that counts the FLOPs and the bytes of every GEMM and every layout copy, plus a
fixed cost per operation (what dominates a single decoded token); its answers are cached.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .errors import KronfactError

Path = Literal["dense", "b_first", "a_first"]
PATHS: tuple[str, ...] = ("dense", "b_first", "a_first")

# Per device type: machine balance (FLOPs per byte of memory traffic: ~200 GFLOP/s fp32 GEMM over
# ~25 GB/s on a 2-core AVX-512 CPU, near 50 on a datacenter GPU); whether a GEMM overlaps its memory traffic
# with its compute (a GPU does; on this CPU a few-row GEMM of a weight from DRAM takes the sum: 1024×256 at 8 rows
# 71 µs, 26 of them compute with the weight in cache, 46 the weight's bytes); the extra cost of a freshly allocated
# intermediate, in multiples of writing it once; the fixed cost of one operation in FLOP units: ~5 µs on CPU
# (dispatch, a small GEMM's packing, a cold cache — fitted on tiny-gpt2's MLP matrices at 1 and 8 rows, where the
# costs of the dense and two-GEMM paths then match their times within 15%), ~5 µs on CUDA (a kernel launch); last,
# that fixed cost in a compiled graph, where elementwise steps fuse into their neighbours: ~4 µs on CPU, a launch on
# CUDA. On CPU, glibc serves blocks above 32 MB with mmap, and first-touch page faults cost ~6× the write itself
# (measured here; a caching malloc such as jemalloc or MALLOC_MMAP_THRESHOLD_ removes it); CUDA's caching allocator
# has none.
MACHINE = {"cpu": (8.0, False, 6.0, 1e6, 0.8e6), "cuda": (50.0, True, 0.0, 1e8, 1e8)}
# GEMMs whose inner dimension or output width is below this run below peak: charged proportionally.
# Few rows (a decoded token) are not: such a GEMM streams its weight once and is memory-bound.
_GEMM_FULL_SPEED_DIM = 32
# Under torch.compile, a transposing copy of the layer's input or output with a side below this is kept
# a library call (kronfact::transposed, :mod:`kronfact.paths`): Inductor would fuse it with the neighbouring
# elementwise ops (the MLP's activation) into a loop over that small side, scalar — 5–10× slower than the copy
# and the activation apart. Being an operator of kronfact's own, it costs eager mode's fixed cost.
FUSED_TRANSPOSE_MIN_DIM = 16
# Thin products over many elements (of their larger side, from THIN_MIN_SIZE) leave MKL's slow forms in eager mode
# (:func:`kronfact.paths._gemm`); a rank-1 product with 3–8 columns, up to 4M outputs, is a GEMM (:func:`broadcasts`)
THIN_MIN_SIZE = 1 << 16
_OUTER_GEMM_COLUMNS, _OUTER_GEMM_MAX_SIZE = range(3, 9), 1 << 22


def broadcasts(m: int, n: int, traced: bool) -> bool:
    """True if the rank-1 product (m, 1) @ (1, n) runs as a broadcast product (:func:`kronfact.paths._gemm`), which
    takes a bias in the same pass; false in a compiled graph, and in eager mode over many rows with 3–8 columns up to
    4M outputs, where MKL's GEMM, and a bias added apart, take 0.6–0.8× its time (cold caches: SmolLM2's Krony-PT 25%
    gate/up expansion (196608, 1) @ (1, 4) 0.48 against 0.81 ms; tiny-gpt2's c_fc at 2048 tokens with its bias, 1.7
    against 2.9 ms). The broadcast wins with 16 columns, at 50M outputs, and with a bias at 6M outputs and 8–12
    columns: the bounds keep the GEMM where it won with a bias and without."""
    return not traced and not (m * n >= THIN_MIN_SIZE and n in _OUTER_GEMM_COLUMNS and m * n < _OUTER_GEMM_MAX_SIZE)


def reorder_copies(t: int, p: int, r: int, q: int) -> bool:
    """True if a path's reordering of its first GEMM's output (t, p, r, q) into the second GEMM's input rows (t, q)
    and columns (p, r) is a copy (A-first: p, q = n2, m1; B-first: n1, m2; the second operand's rows are ordered
    (p, r) to match). (p, r) stays adjacent, so only t and q can fail to merge: one row (a decoded token) is a
    transposed view, which the GEMM reads as it is, and q = 1 (e.g. the row A (1, n1) of a balanced
    down-projection) is no reordering at all."""
    return t > 1 and q > 1 and p * r > 1


@dataclass(frozen=True)
class Op:
    """One step of a path: a GEMM (m×k)·(k×n), or a copy (or bias addition) of ``m`` elements (k = n = 0);
    ``opaque``: run by one of kronfact's own operators, with eager mode's fixed cost even in a compiled graph;
    ``in_place``: writes into the previous step's output, allocating nothing."""

    m: int
    k: int = 0
    n: int = 0
    opaque: bool = False
    in_place: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n

    @property
    def out_elems(self) -> int:
        return self.m * self.n if self.k else self.m

    def cost(self, balance: float, elem_bytes: int, overlap: bool = True) -> float:
        """Estimated time in FLOP units: a copy's memory traffic; a GEMM's compute and memory traffic, the larger of
        the two if the device ``overlap``s them (roofline), else their sum."""
        if not self.k:  # layout copy: read + write
            return 2 * self.m * elem_bytes * balance
        traffic = (self.m * self.k + self.k * self.n + self.m * self.n) * elem_bytes
        speed = min(1.0, max(1, min(self.k, self.n)) / _GEMM_FULL_SPEED_DIM)
        compute, memory = self.flops / speed, traffic * balance
        return max(compute, memory) if overlap else compute + memory


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
    if path == "b_first":  # (r, m1, n1) as (n1·r, m1): a view when r or n1 is 1
        return r * m1 * n1 if min(r, n1) > 1 else 0
    return r * m2 * n2 if min(r, n2) > 1 else 0


def path_ops(path: str, tokens: int, rank: int, shape_a: tuple[int, int], shape_b: tuple[int, int],
             cached: bool = False, traced: bool = False, bias: bool = False) -> list[Op]:
    """The GEMMs and copies of ``path`` for ``tokens`` input rows (mirrors :func:`kronfact.paths.steps`); ``cached``:
    the layer keeps its weights laid out between calls (eval mode, no autograd), else a call builds or copies them;
    ``traced``: in a compiled graph, where the cached dense weight is read by kronfact::cached_call and a
    transposing copy with a small side is kronfact::transposed (both opaque); ``bias``: the layer has one, added by
    an operation of its own in eager mode when the last GEMM cannot take it (Inductor fuses it with what follows)."""
    ops = _ops(path, tokens, rank, shape_a, shape_b, cached, traced)
    (m1, n1), (m2, n2) = shape_a, shape_b
    # the bias joins the last GEMM when it adds to whole output rows, or to a broadcast product (inner size 1); else it
    # is added into the GEMM's output — B-first's out of place unless A is a row
    joins = {"dense": True, "b_first": m2 == 1 or (m1 == 1 and rank * n1 == 1),
             "a_first": m1 == 1 or (rank * n2 == 1 and broadcasts(tokens * m1, m2, traced))}
    if bias and not traced and not joins[path]:
        ops.append(Op(tokens * m1 * m2, in_place=path == "a_first" or m1 == 1))
    return ops


def _ops(path: str, tokens: int, rank: int, shape_a: tuple[int, int], shape_b: tuple[int, int], cached: bool,
         traced: bool) -> list[Op]:
    (m1, n1), (m2, n2), r, t = shape_a, shape_b, rank, tokens
    if path == "dense":
        build = [] if cached else [Op(m1 * n1, r, m2 * n2), Op(weight_copy(path, r, shape_a, shape_b))]
        return build + [Op(t, n1 * n2, m1 * m2, opaque=traced and cached)]
    copy = 0 if cached else weight_copy(path, r, shape_a, shape_b)
    if path == "b_first":
        ops = [Op(copy)] if copy else []
        ops.append(Op(t * n1, n2, r * m2))
        if reorder_copies(t, n1, r, m2):
            ops.append(Op(t * n1 * r * m2))
        ops.append(Op(t * m2, r * n1, m1))
        if _moves((t, m2, m1), (0, 2, 1)):
            ops.append(Op(t * m1 * m2, opaque=traced and min(m1, m2) < FUSED_TRANSPOSE_MIN_DIM))
        return ops
    if path == "a_first":
        ops = [Op(copy)] if copy else []
        if t > 1 and _moves((t, n1, n2), (0, 2, 1)):  # one row: the first GEMM reads it transposed, a strided view
            ops.append(Op(t * n1 * n2, opaque=traced and min(n1, n2) < FUSED_TRANSPOSE_MIN_DIM))
        ops.append(Op(t * n2, n1, r * m1))
        if reorder_copies(t, n2, r, m1):
            ops.append(Op(t * n2 * r * m1))
        ops.append(Op(t * m1, r * n2, m2))
        return ops
    raise KronfactError(f"path must be one of {PATHS}, got {path!r}")


def path_cost(path: str, tokens: int, rank: int, shape_a: tuple[int, int], shape_b: tuple[int, int],
              *, device_type: str = "cpu", elem_bytes: int = 4, cached: bool = False, traced: bool = False,
              bias: bool = False) -> float:
    """Estimated time of ``path`` in FLOP units: its ops' costs and fixed costs (``traced``: run from a
    compiled graph) plus, for every intermediate it allocates (all op outputs but the last, none in place), the
    device's allocation penalty."""
    balance, overlap, alloc, per_op, traced_op = MACHINE.get(device_type, MACHINE["cuda"])
    ops = path_ops(path, tokens, rank, shape_a, shape_b, cached, traced, bias)
    fresh = sum(op.out_elems for op in [op for op in ops if not op.in_place][:-1]) * elem_bytes
    fixed = sum(per_op if op.opaque or not traced else traced_op for op in ops)
    return sum(op.cost(balance, elem_bytes, overlap) for op in ops) + fixed + alloc * fresh * balance


@functools.lru_cache(maxsize=4096)
def plan(tokens: int, rank: int, shape_a: tuple[int, int], shape_b: tuple[int, int], *,
         device_type: str = "cpu", elem_bytes: int = 4, cached: bool = False, traced: bool = False,
         bias: bool = False) -> str:
    """The cheapest of ``PATHS`` under :func:`path_cost` (dense wins ties); cached per arguments. Plain
    comparisons, no ``min(key=)``: torch.compile traces it with a symbolic ``tokens`` (dynamic shapes)."""
    best, best_cost = PATHS[0], None
    for path in PATHS:
        cost = path_cost(path, tokens, rank, shape_a, shape_b, device_type=device_type, elem_bytes=elem_bytes,
                         cached=cached, traced=traced, bias=bias)
        if best_cost is None or cost < best_cost:
            best, best_cost = path, cost
    return best
