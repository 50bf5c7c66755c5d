"""``kronfact::cached_call``: a KronLinear's inference call inside a compiled graph, as one opaque operator.

A compiled graph traces a KronLinear in eval mode without autograd when its path reads both GEMM operands as views
of the factors: plain low rank, or a path :meth:`~kronfact.layer.KronLinear.lay_out` laid them out for — library
GEMMs on views, without this operator's Python (SmolLM2 Krony-PT 50%, compiled decode b1: 1.13× → 1.32× the
original). When the plan is the dense weight, or operands that are copies, traced code would rebuild them on every
call (at a decoded token, the whole cost): the graph calls this operator instead, which runs the layer as in eager
mode, with its cached dense weight or GEMM operands.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .kron import kron_sum, permute_weight
from .paths import LIBRARY

if TYPE_CHECKING:
    from .layer import KronLinear

# Every live KronLinear by id(): the operator finds its layer's caches here.
LAYERS: weakref.WeakValueDictionary[int, KronLinear] = weakref.WeakValueDictionary()


def _cached_call_impl(x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None, in_perm: Tensor | None,
                      out_perm: Tensor | None, layer_id: int) -> Tensor:
    """Runs the layer ``layer_id`` on ``x`` and the tensors passed, with its caches (keyed by those tensors, so a
    stale entry only costs a rebuild)."""
    layer = LAYERS.get(layer_id)
    if layer is None:  # not expected: correct, if slow
        return F.linear(x, permute_weight(kron_sum(a, b), in_perm, out_perm), bias)
    if in_perm is None and out_perm is None:  # (forward only calls this without autocast)
        return layer._infer(x, a, b, bias)
    return layer._call(x, a, b, bias, in_perm, out_perm, grad=False, cacheable=True, compiling=False)


def _cached_call_fake(x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None, in_perm: Tensor | None,
                      out_perm: Tensor | None, layer_id: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], a.shape[1] * b.shape[1])


LIBRARY.define("cached_call(Tensor x, Tensor a, Tensor b, Tensor? bias, Tensor? in_perm, Tensor? out_perm, "
               "int layer_id) -> Tensor")
LIBRARY.impl("cached_call", _cached_call_impl, "CompositeExplicitAutograd")
torch.library.register_fake("kronfact::cached_call", _cached_call_fake, lib=LIBRARY)
cached_call = torch.ops.kronfact.cached_call.default
