"""KronLinear equals its dense equivalent on every path; the planner; compile; bad input."""

import functools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import kronfact
from kronfact.kron import kron_sum
from kronfact.layer import KronLinear
from kronfact.paths import path_operands
from kronfact.plans import PATHS, path_cost, path_ops, plan, weight_copy

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


@st.composite
def layer_case(draw):
    m1, n1, m2, n2 = (draw(st.integers(1, 6)) for _ in range(4))
    rank = draw(st.integers(1, min(m1 * n1, m2 * n2, 3)))
    lead = draw(st.lists(st.integers(0, 4), min_size=0, max_size=2))
    return m1, n1, m2, n2, rank, tuple(lead), draw(st.integers(0, 2**31)), draw(st.booleans())


def _layer(m1, n1, m2, n2, rank, bias, dtype, path, seed):
    torch.manual_seed(seed)
    return KronLinear(n1 * n2, m1 * m2, (m1, n1), rank, bias=bias, dtype=dtype, path=path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", list(TOL))
@given(case=layer_case())
@settings(max_examples=25, deadline=None)
def test_forward_equals_dense_on_every_path(path, dtype, case):
    m1, n1, m2, n2, rank, lead, seed, bias = case
    layer = _layer(m1, n1, m2, n2, rank, bias, dtype, path, seed)
    x = torch.randn(*lead, n1 * n2, generator=torch.Generator().manual_seed(seed)).to(dtype)
    y = layer(x)
    assert y.shape == (*lead, m1 * m2) and y.dtype == dtype
    w = layer.to_dense().double()
    ref = x.double() @ w.T + (layer.bias.double() if bias else 0)
    scale = 1 + float(x.double().abs().sum(-1).max() * w.detach().abs().max()) if x.numel() else 1
    torch.testing.assert_close(y.double(), ref, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("path", PATHS)
@given(case=layer_case())
@settings(max_examples=25, deadline=None)
def test_gradients_equal_the_dense_equivalent_on_every_path(path, case):
    m1, n1, m2, n2, rank, lead, seed, bias = case
    layer = _layer(m1, n1, m2, n2, rank, bias, torch.float64, path, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, n1 * n2, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(*lead, m1 * m2, generator=g, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()

    a, b = layer.a.detach().clone().requires_grad_(), layer.b.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    bias2 = layer.bias.detach().clone().requires_grad_() if bias else None
    w = sum(torch.kron(a[i], b[i]) for i in range(rank))
    (nn.functional.linear(x2, w, bias2) * upstream).sum().backward()
    for got, want in [(x.grad, x2.grad), (layer.a.grad, a.grad), (layer.b.grad, b.grad)] + (
        [(layer.bias.grad, bias2.grad)] if bias else []
    ):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_every_parameter_receives_a_gradient_on_every_path():
    for path in PATHS:
        layer = KronLinear(12, 20, (4, 3), rank=2, path=path)
        layer(torch.randn(3, 12)).square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters()), path


@given(m1=st.integers(1, 64), n1=st.integers(1, 64), m2=st.integers(1, 64), n2=st.integers(1, 64),
       r=st.integers(1, 4), t=st.integers(1, 4096))
@settings(max_examples=100, deadline=None)
def test_cost_model_counts_the_documented_flops(m1, n1, m2, n2, r, t):
    def gemm_flops(path):
        return sum(op.flops for op in path_ops(path, t, r, (m1, n1), (m2, n2), cached=True))

    assert gemm_flops("b_first") == t * r * 2 * m2 * n1 * (n2 + m1)
    assert gemm_flops("a_first") == t * r * 2 * m1 * n2 * (n1 + m2)
    assert gemm_flops("dense") == t * 2 * m1 * m2 * n1 * n2
    assert plan(t, r, (m1, n1), (m2, n2)) in PATHS


@given(r=st.integers(1, 3), m1=st.integers(1, 3), n1=st.integers(1, 3), m2=st.integers(1, 3), n2=st.integers(1, 3))
@settings(max_examples=60, deadline=None)
def test_weight_copy_counts_exactly_the_operands_that_are_not_views(r, m1, n1, m2, n2):
    a, b = torch.randn(r, m1, n1), torch.randn(r, m2, n2)
    for path, first, second in (("b_first", b, a), ("a_first", a, b)):
        w1, w2 = path_operands(a, b, path)
        assert w1.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()  # always a view
        is_view = w2.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
        assert weight_copy(path, r, (m1, n1), (m2, n2)) == (0 if is_view else second.numel())
        copies = len(path_ops(path, 5, r, (m1, n1), (m2, n2))) - len(path_ops(path, 5, r, (m1, n1), (m2, n2), True))
        assert copies == (0 if is_view else 1)  # charged to uncached calls (training, a traced graph) only
    assert weight_copy("dense", r, (m1, n1), (m2, n2)) == m1 * m2 * n1 * n2


@pytest.mark.parametrize("path", ["a_first", "b_first"])
@given(case=layer_case(), t=st.integers(1, 3))
@settings(max_examples=100, deadline=None)
def test_the_cost_model_charges_exactly_the_copies_a_call_makes(path, case, t):
    """An inference call on laid-out factors copies exactly where :func:`path_ops` charges a copy (one row's input
    transpose is a strided view the GEMM reads; a second GEMM's input is reordered only when it must be), and adds
    the bias by an operation of its own exactly where it charges one."""
    m1, n1, m2, n2, rank, _, seed, bias = case
    layer = _layer(m1, n1, m2, n2, rank, bias, torch.float32, path, seed).eval()
    x = torch.randn(t, n1 * n2)
    with torch.no_grad():
        layer(x)  # prepared: operands and steps kept
        ops = _aten_ops(lambda: layer(x))
    charged = [op for op in path_ops(path, t, rank, (m1, n1), (m2, n2), cached=True) if not op.k]
    assert ops.count("clone") == len(charged), (ops, charged)
    assert "copy_" not in ops
    adds = len(path_ops(path, t, rank, (m1, n1), (m2, n2), cached=True, bias=bias)) - len(charged) - 2  # 2 GEMMs
    assert ops.count("add") + ops.count("add_") == adds, (ops, adds)


@given(r=st.integers(1, 200), m1=st.integers(1, 600), n1=st.integers(1, 600), m2=st.integers(1, 600),
       n2=st.integers(1, 600), t=st.integers(1, 64))
@settings(max_examples=200, deadline=None)
def test_a_compiled_graph_plans_with_a_lower_cost_per_operation(r, m1, n1, m2, n2, t):
    """Traced, an operation Inductor runs costs less than in eager mode (no Python); one of kronfact's own operators
    (the cached dense weight's kronfact::cached_call, a kronfact::transposed copy) costs the same. So no path costs
    more, and a Kronecker path planned for eager inference stays one in a compiled graph."""
    shapes = (r, (m1, n1), (m2, n2))
    for path in PATHS:
        for cached in (True, False):
            ops, traced_ops = (path_ops(path, t, *shapes, cached, traced) for traced in (False, True))
            assert [(op.m, op.k, op.n) for op in ops] == [(op.m, op.k, op.n) for op in traced_ops]
            eager, traced = path_cost(path, t, *shapes, cached=cached), path_cost(path, t, *shapes, cached=cached,
                                                                                   traced=True)
            assert traced < eager if not all(op.opaque for op in traced_ops) else traced == eager
    assert all(op.opaque for op in path_ops("dense", t, *shapes, cached=True, traced=True))
    if plan(t, *shapes, cached=True) != "dense":
        assert plan(t, *shapes, cached=True, traced=True) != "dense"


def test_a_layer_whose_eager_plan_is_dense_is_laid_out_and_traced_on_its_compiled_path():
    """tiny-gpt2's balanced c_fc shape (A 2×256, B 512×1) at rank 200, one token: the cached dense weight in eager
    mode, A-first in a compiled graph. eval() lays the factors out, so the compiled call is traced (no
    kronfact::cached_call) and equals the eager one."""
    from torch._dynamo.testing import CompileCounterWithBackend

    layer = KronLinear(256, 1024, (2, 256), rank=200).eval()
    assert layer.choose_path(1, cached=True) == "dense"
    assert layer.choose_path(1, cached=True, traced=True) == "a_first"
    assert KronLinear._laid_out(layer.a, layer.b)
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("inductor")
    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend=backend)(x), layer(x),
                                   rtol=1e-4, atol=1e-4)
    assert "kronfact.cached_call" not in str(backend.graphs[-1].graph)


def test_planner_prefers_the_cheap_order_and_dense_when_nothing_saves():
    # Krony-PT 81M c_fc (ours: A 768×768, B 4×1): A-first is 4× fewer FLOPs; c_proj mirrored: B-first.
    assert plan(4096, 1, (768, 768), (4, 1)) == "a_first"
    assert plan(4096, 1, (768, 768), (1, 4)) == "b_first"
    # Krony-PT 92M (256×1024 ⊗ 3×3, rank 4) costs more FLOPs than the dense layer in either order.
    assert plan(4096, 4, (1024, 256), (3, 3), cached=True) == "dense"


@given(m=st.integers(256, 4096), n=st.integers(256, 4096), traced=st.booleans(), bias=st.booleans())
@settings(max_examples=200, deadline=None)
def test_a_decoded_token_of_a_krony_pt_shape_takes_the_order_with_half_the_flops(m, n, traced, bias):
    """A (m, n) ⊗ B (1, 2), rank 1, one token: both orders read A once, but A-first multiplies it by two rows of the
    input and B-first by their weighted sum. On CPU a GEMM's compute adds to its bytes, so B-first costs less (A-first
    for the mirror B (2, 1)), in eager mode and in a compiled graph; the plan is that order or the dense weight."""
    kw = {"cached": True, "traced": traced, "bias": bias}
    assert path_cost("b_first", 1, 1, (m, n), (1, 2), **kw) < path_cost("a_first", 1, 1, (m, n), (1, 2), **kw)
    assert path_cost("a_first", 1, 1, (m, n), (2, 1), **kw) < path_cost("b_first", 1, 1, (m, n), (2, 1), **kw)
    assert plan(1, 1, (m, n), (1, 2), **kw) != "a_first" and plan(1, 1, (m, n), (2, 1), **kw) != "b_first"
    gemm = path_ops("b_first", 1, 1, (m, n), (1, 2), cached=True)[-1]  # (1, n) @ (n, m): compute + bytes on CPU
    assert gemm.cost(8.0, 4, overlap=False) == gemm.flops + (n + n * m + m) * 4 * 8.0
    assert gemm.cost(8.0, 4, overlap=True) == max(gemm.flops, (n + n * m + m) * 4 * 8.0)


def test_from_linear_to_linear_and_dense_agree():
    linear = nn.Linear(12, 20)
    layer = KronLinear.from_linear(linear, (4, 3), rank=12)  # full rank: exact
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.to_linear()(x), layer(x), rtol=1e-5, atol=1e-5)
    assert layer.to_dense().shape == (20, 12)
    assert "shape_a=(4, 3), shape_b=(5, 4), rank=12" in repr(layer)


def test_eval_cache_follows_parameter_updates():
    layer = KronLinear(12, 20, (4, 3), rank=4, path="dense").eval()
    x = torch.randn(5, 12)
    with torch.no_grad():
        first = layer(x)
        layer.a.mul_(2)
        second = layer(x)
    torch.testing.assert_close(second - layer.bias, 2 * (first - layer.bias))
    cached = layer._dense_cache[1]  # stored (in, out) row-major: what BLAS reads fastest in x·W
    assert cached.T.is_contiguous() and torch.equal(cached, layer.to_dense())


@pytest.mark.parametrize("path", ["a_first", "b_first"])
@given(case=layer_case())
@settings(max_examples=25, deadline=None)
def test_eval_lays_the_factors_out_as_row_major_operands(path, case):
    m1, n1, m2, n2, rank, lead, seed, bias = case
    layer = _layer(m1, n1, m2, n2, rank, bias, torch.float64, path, seed)
    twin = _layer(m1, n1, m2, n2, rank, bias, torch.float64, path, seed)  # stays contiguous
    x = torch.randn(*lead, n1 * n2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    params = (layer.a, layer.b)  # an optimizer holds these: they must stay the layer's parameters
    layer.eval()
    assert torch.equal(layer.a, twin.a) and torch.equal(layer.b, twin.b)  # values and shapes unchanged
    if not layer._low_rank:  # one layout for both paths, whichever the layer takes
        for either, factors in (("a_first", (layer.a, layer.b)), ("b_first", (layer.b, layer.a))):
            for w, factor in zip(path_operands(layer.a, layer.b, either), factors, strict=True):
                assert w.is_contiguous() and w.untyped_storage().data_ptr() == factor.untyped_storage().data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), twin(x), rtol=1e-10, atol=1e-10)
    layer.train()  # training stores the factors contiguous again, same values and parameter objects
    assert layer.a.is_contiguous() and layer.b.is_contiguous() and layer.a is params[0] and layer.b is params[1]
    assert torch.equal(layer.a, twin.a) and torch.equal(layer.b, twin.b)
    (layer(x) ** 2).sum().backward()
    (twin(x) ** 2).sum().backward()
    for name in ("a", "b"):
        p, q = getattr(layer, name), getattr(twin, name)
        assert p.grad.is_contiguous()
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10)


def test_empty_batch_and_autocast():
    layer = KronLinear(12, 20, (4, 3), rank=2)
    assert layer(torch.randn(0, 12)).shape == (0, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(3, 12))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [((4, 3), (5, 1)), ((4, 1), (5, 3)), ((1, 3), (20, 4))])
def test_autocast_training_step_on_every_path(path, shape):
    """bf16 autocast forward and backward: outputs in bf16, fp32 gradients close to the fp32 ones
    (size-1 factor dimensions included: they take the broadcast-product GEMMs)."""
    (m1, n1), (m2, n2) = shape
    torch.manual_seed(0)
    layer = KronLinear(n1 * n2, m1 * m2, (m1, n1), rank=2, path=path)
    x = torch.randn(2, 7, n1 * n2, requires_grad=True)
    upstream = torch.randn(2, 7, m1 * m2)
    (layer(x) * upstream).sum().backward()
    want = [t.grad.clone() for t in (x, layer.a, layer.b, layer.bias)]
    for t in (x, layer.a, layer.b, layer.bias):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    (y.float() * upstream).sum().backward()
    for t, ref in zip((x, layer.a, layer.b, layer.bias), want, strict=True):
        assert t.grad.dtype == torch.float32
        torch.testing.assert_close(t.grad, ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "autocast"])
def test_compiles_without_graph_breaks_and_trains(dtype):
    """fullgraph compile of every path, size-1 factor dims (broadcast-product GEMMs, and a (m, 2) @ (2, 1) one as a
    sum of broadcast columns) and small-sided transposes (kept library calls) included, in fp32, bf16 and fp32 under
    bf16 autocast; the compiled gradients equal eager ones, in every parameter's dtype."""
    torch._dynamo.reset()
    autocast = dtype == "autocast"
    dtype = torch.float32 if autocast else dtype
    model = nn.Sequential(
        KronLinear(32, 64, (8, 8), 1, path="a_first"), nn.GELU(),
        KronLinear(64, 32, (8, 8), 2, path="b_first"), nn.GELU(),
        KronLinear(32, 128, (32, 32), 1, path="a_first"), nn.GELU(),   # B (4, 1)
        KronLinear(128, 32, (32, 32), 1, path="b_first"), nn.GELU(),   # B (1, 4)
        KronLinear(32, 64, (32, 32), 1, path="a_first"), nn.GELU(),    # B (2, 1)
        KronLinear(64, 32, (32, 32), 1, path="b_first"), nn.GELU(),    # B (1, 2): a sum of two broadcast columns
        KronLinear(32, 48, (4, 4), 3),
    ).to(dtype)
    x = torch.randn(2, 7, 32, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        eager = model(x)
        eager.float().square().mean().backward()
        want = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
        out = compiled(x)
    tol = TOL[torch.bfloat16 if autocast else dtype]
    torch.testing.assert_close(out, eager, rtol=tol, atol=tol * 10)
    out.float().square().mean().backward()
    for p, ref in zip(model.parameters(), want, strict=True):
        assert p.grad is not None and p.grad.dtype == dtype
        torch.testing.assert_close(p.grad, ref, rtol=tol * 10, atol=tol * 10 * float(ref.abs().max()))


@pytest.mark.slow
def test_compiles_without_graph_breaks_when_the_token_count_changes():
    """Dynamic shapes: the planner runs on a symbolic token count inside the graph (fullgraph)."""
    torch._dynamo.reset()
    model = nn.Sequential(KronLinear(64, 128, (8, 8), 3), nn.GELU(), KronLinear(128, 64, (1, 128), 4))
    compiled = torch.compile(model, fullgraph=True)
    for t in (16, 24, 40):  # the second size recompiles with a symbolic size
        x = torch.randn(2, t, 64)
        torch.testing.assert_close(compiled(x), model(x), rtol=TOL[torch.float32], atol=TOL[torch.float32] * 10)


@pytest.mark.slow
def test_compiled_inference_traces_laid_out_paths_and_caches_the_rest():
    """Compiled, eval mode, no autograd: a Kronecker path whose GEMM operands are views of the laid-out factors, and
    plain low rank, are traced; a dense path, or factors not laid out for the path, run as one kronfact::cached_call
    (the eager plan and caches). Outputs equal eager ones, after in-place updates and in a deep copy too (each layer
    finds its own caches). Training mode is traced."""
    import copy

    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = nn.Sequential(KronLinear(32, 64, (8, 8), 3, path="a_first"), nn.GELU(),
                          KronLinear(64, 32, (16, 64), 1, path="b_first"), nn.GELU(),
                          KronLinear(32, 32, (32, 1), 4), nn.GELU(),  # plain low rank
                          KronLinear(32, 48, (4, 4), 2, path="dense")).eval()
    backend = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        assert str(backend.graphs[-1].graph).count("kronfact.cached_call") == 1  # the dense layer only
        model[0].b.mul_(-1)
        model[6].a.mul_(2)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        twin = copy.deepcopy(model)
        twin[0].a.mul_(3)
        twin[6].b.mul_(3)
        torch.testing.assert_close(torch.compile(twin, fullgraph=True)(x), twin(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        model[0].a.data = model[0].a.contiguous()  # no longer laid out: its path would copy an operand
        torch._dynamo.reset()
        backend = CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        assert str(backend.graphs[-1].graph).count("kronfact.cached_call") == 2
    model.train()
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    assert "kronfact.cached_call" not in str(backend.graphs[-1].graph)


def test_cached_call_equals_the_layer_and_survives_an_unknown_layer():
    layer = KronLinear(12, 20, (4, 3), rank=2).eval()
    x = torch.randn(3, 12)
    args = (x, layer.a, layer.b, layer.bias, None, None)
    with torch.no_grad():
        want = layer(x)
        torch.testing.assert_close(torch.ops.kronfact.cached_call(*args, id(layer)), want)
        torch.testing.assert_close(torch.ops.kronfact.cached_call(*args, -1), want)  # no such layer: rebuilt


@pytest.mark.parametrize(
    "args,message",
    [
        ((12, 20, (3, 4), 1), r"shape_a=\(3, 4\) does not divide"),
        ((12, 20, (4, 3), 13), r"rank must be an int in \[1, 12\]"),
        ((12, 20, (4, 3), 1, True, None, None, "fast"), r"path must be 'auto' or one of"),
    ],
)
def test_bad_construction_is_a_clear_error(args, message):
    with pytest.raises(ValueError, match=message):
        KronLinear(*args)


def test_bad_inputs_to_forward_are_clear_errors():
    layer = KronLinear(12, 20, (4, 3), rank=1)
    with pytest.raises(ValueError, match=r"expects inputs \(\.\.\., 12\)"):
        layer(torch.randn(3, 10))
    with pytest.raises(ValueError, match="float64 input"):
        layer(torch.randn(3, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="expects an nn.Linear"):
        KronLinear.from_linear(nn.Conv2d(1, 1, 1), (1, 1))


def test_public_api_is_exported():
    for name in ["KronLinear", "decompose", "factor_shapes", "kron_spectrum", "KronFactors"]:
        assert hasattr(kronfact, name)


@pytest.mark.parametrize("path", ["b_first", "a_first"])
def test_vmap_per_sample_gradients(path):
    """torch.func works through the Kronecker paths (per-sample gradients as Opacus-style users need)."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    layer = KronLinear(6, 12, (3, 1), rank=2, path=path)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    xs = torch.randn(4, 5, 6)

    def loss(p, x):
        return functional_call(layer, p, (x,)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(len(xs)):
        want = torch.autograd.grad(loss(dict(layer.named_parameters()), xs[i]), list(layer.parameters()))
        for (name, _), w in zip(layer.named_parameters(), want, strict=True):
            torch.testing.assert_close(per_sample[name][i], w)


@pytest.mark.parametrize("path", ["b_first", "a_first"])
@pytest.mark.parametrize("shape_a", [(4, 3), (20, 1), (1, 12), (4, 12)])  # general, and sides of size 1
@pytest.mark.parametrize("bias", [True, False])
def test_forward_mode_jacobians_equal_reverse_mode(path, shape_a, bias):
    """torch.func.jacfwd (forward-mode AD, through the custom GEMM's jvp) agrees with reverse mode, in the input
    and in every parameter."""
    from torch.func import functional_call, jacfwd

    torch.manual_seed(0)
    layer = KronLinear(12, 20, shape_a, rank=2, bias=bias, dtype=torch.float64, path=path)
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(jacfwd(layer)(x), torch.autograd.functional.jacobian(layer, x))
    params = dict(layer.named_parameters())
    forward = jacfwd(lambda p: functional_call(layer, p, (x,)))(params)
    reverse = torch.autograd.functional.jacobian(
        lambda *ps: functional_call(layer, dict(zip(params, ps, strict=True)), (x,)), tuple(params.values()))
    for name, want in zip(params, reverse, strict=True):
        torch.testing.assert_close(forward[name], want)


def _aten_ops(fn) -> list[str]:
    """The aten operators ``fn()`` dispatches, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Log() as log:
        fn()
    return log.ops


@pytest.mark.parametrize("shape_a", [(20, 1), (1, 12)])  # A a column ⊗ B a row, and the mirror
@pytest.mark.parametrize("bias", [True, False])
def test_plain_low_rank_is_exactly_two_gemms(shape_a, bias):
    layer = KronLinear(12, 20, shape_a, rank=3, bias=bias).eval()
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        gemms = [op for op in _aten_ops(lambda: layer(x)) if op in ("mm", "addmm", "bmm", "matmul", "linear")]
        copies = [op for op in _aten_ops(lambda: layer(x)) if op in ("clone", "copy_", "contiguous", "add")]
    assert len(gemms) == 2 and not copies
    assert layer.choose_path(10) == ("b_first" if shape_a == (20, 1) else "a_first")
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + (layer.bias if bias else 0), rtol=1e-5, atol=1e-5)


def _spy_on_products(monkeypatch, request, *names: str) -> dict[str, list[tuple[int, ...]]]:
    """Record the shapes (x's, then w's) each of these GEMM forms of :mod:`kronfact.paths` is called with; steps
    built before are dropped, and so are the ones built here, after the test."""
    from kronfact import paths

    calls = {name: [] for name in names}

    def spy(name):
        run, log = getattr(paths, name), calls[name]
        return lambda x, w, b: log.append(tuple(x.shape) + tuple(w.shape)) or run(x, w, b)
    for name in names:
        monkeypatch.setattr(paths, name, spy(name))
    paths._build.cache_clear()
    request.addfinalizer(paths._build.cache_clear)  # no kept steps call the spies later
    return calls


def _check_equals_dense(layer: KronLinear, x: Tensor) -> None:
    """The layer equals its dense equivalent on x (requires_grad): output, gradients of x and every parameter, second
    derivatives, forward-mode derivatives, and without autograd in eval mode, also under torch.func.vmap."""
    y, dense = layer(x), F.linear(x, layer.to_dense(), layer.bias)
    torch.testing.assert_close(y, dense)
    g = torch.randn_like(y)
    params = [x, *layer.parameters()]
    for got, want in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(dense, params, g), strict=True):
        torch.testing.assert_close(got, want)
    outs = layer(x), F.linear(x, layer.to_dense(), layer.bias)  # afresh: the first graphs are freed
    (gx,), (gx_dense,) = (torch.autograd.grad(out.square().sum(), x, create_graph=True) for out in outs)
    for got, want in zip(torch.autograd.grad(gx, params, g[:, :1].expand_as(x)),
                         torch.autograd.grad(gx_dense, params, g[:, :1].expand_as(x)), strict=True):
        torch.testing.assert_close(got, want)
    with fwAD.dual_level():
        tangent = torch.randn_like(x)
        got = fwAD.unpack_dual(layer(fwAD.make_dual(x.detach(), tangent))).tangent
    torch.testing.assert_close(got, tangent @ layer.to_dense().detach().T)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), dense)
        batched = torch.func.vmap(layer)(x.detach().expand(2, *x.shape))
    torch.testing.assert_close(batched, dense.detach().expand(2, *dense.shape))


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_thin_products_over_many_rows_run_by_columns_and_equal_the_dense_layer(k, bias, monkeypatch, request):
    """Krony-PT's B (1, k) and B (k, 1) over many rows: B-first's first GEMM (t·n1, k) @ (k, 1) and A-first's input
    gradient g (t·m1, k) @ (k, 1) run as sums of k broadcast columns; with k = 2, B-first's input gradient
    (t·n1, 1) @ (1, 2) and A-first's last GEMM without a bias, one product per output column. The layer still equals
    its dense equivalent — output, gradients, second derivatives and forward-mode derivatives (where autograd
    records, the latter is the GEMM), with and without autograd, and under torch.func.vmap (the GEMM too)."""
    calls = _spy_on_products(monkeypatch, request, "_column_sum", "_outer_columns")
    torch.manual_seed(0)
    for shape_b, path in (((1, k), "b_first"), ((k, 1), "a_first"), ((1, k), "a_first")):
        layer = KronLinear(8 * shape_b[1], 6 * shape_b[0], (6, 8), bias=bias, dtype=torch.float64, path=path)
        _check_equals_dense(layer, torch.randn(8192, layer.in_features, dtype=torch.float64, requires_grad=True))
    assert (8192 * 8, k, k, 1) in calls["_column_sum"] and (8192 * 6, k, k, 1) in calls["_column_sum"]
    assert ((8192 * 8, 1, 1, k) in calls["_outer_columns"]) == (k == 2)
    assert ((8192 * 6, 1, 1, k) in calls["_outer_columns"]) == (k == 2)  # A-first's: its input gradient with B (1, 2)


@pytest.mark.parametrize("bias", [True, False])
def test_a_rank_one_expansion_over_many_rows_is_one_gemm(bias, monkeypatch, request):
    """B (4, 1) — Krony-PT 81M's up-projection shape — makes A-first's last GEMM (t·m1, 1) @ (1, 4) and B-first's first
    (t·n1, 1) @ (1, 4): over many rows one GEMM (faster there than the broadcast product, a bias then added apart), at
    one token the broadcast product (A-first's with a bias fused into it). The layer equals its dense equivalent in
    every mode, and the cost model charges the bias addition where a call makes it."""
    calls = _spy_on_products(monkeypatch, request, "_mm", "_mul")
    torch.manual_seed(0)
    for path, rows in (("a_first", 6), ("b_first", 8)):
        layer = KronLinear(8, 24, (6, 8), bias=bias, dtype=torch.float64, path=path)  # B (4, 1)
        for tokens in (8192, 1):
            x = torch.randn(tokens, 8, dtype=torch.float64, requires_grad=True)
            _check_equals_dense(layer.train(), x)
            with torch.no_grad():
                ops = _aten_ops(functools.partial(layer, x))
            charged = [len(path_ops(path, tokens, 1, (6, 8), (4, 1), cached=True, bias=b)) for b in (bias, False)]
            assert ops.count("add") + ops.count("add_") == charged[0] - charged[1]
        assert (8192 * rows, 1, 1, 4) in calls["_mm"] and (rows, 1, 1, 4) not in calls["_mm"]
    assert (6, 1, 1, 4) in calls["_mul"] and (8, 1, 1, 4) in calls["_mul"]  # one token: the broadcast product


def test_training_adds_a_bias_spanning_several_rows_in_place():
    """A-first's last GEMM yields (t·m1, m2) rows; the bias (m1·m2,) spans m1 of them. Under autograd it is added
    in place (no output-sized temporary in the forward, no full-gradient copy in the backward)."""
    layer = KronLinear(12, 20, (4, 3), rank=2, path="a_first")
    x = torch.randn(6, 12, requires_grad=True)
    out = []
    ops = _aten_ops(lambda: out.append(layer(x)))
    assert "add_" in ops and "add" not in ops

    def nodes(fn):
        return [] if fn is None else [type(fn).__name__] + [n for f, _ in fn.next_functions for n in nodes(f)]
    assert "CopySlices" not in nodes(out[0].grad_fn)


@pytest.mark.parametrize("path", PATHS)
def test_no_autograd_function_when_no_gradient_is_needed(path, monkeypatch):
    """Inference (no_grad, or frozen parameters and input) never enters the Python autograd function."""
    from kronfact import paths

    layer = KronLinear(12, 20, (4, 3), rank=2, path=path)
    x = torch.randn(3, 12)
    want = layer(x).detach()

    def refuse(*args):
        raise AssertionError("autograd function called without a gradient to compute")

    monkeypatch.setattr(paths._MatMul, "apply", refuse)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
    layer.requires_grad_(False)
    torch.testing.assert_close(layer(x), want)


def test_inference_reuses_its_prepared_call_until_the_layer_changes():
    """Eval mode, no autograd: a call's operands are prepared once per input size and reused while the factors are
    unchanged; an in-place update, a replaced factor, a removed bias, a deep copy and a pickle round trip all give
    the layer's current function."""
    import copy
    import pickle

    layer = KronLinear(12, 20, (4, 3), rank=2, path="b_first").eval()
    layer.a.data = layer.a.contiguous()  # not laid out: b_first's second operand is a copy of a, made on a miss

    def check():
        for tokens in (1, 7, 1):
            x = torch.randn(tokens, 12)
            want = x @ layer.to_dense().T + (0 if layer.bias is None else layer.bias)
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)

    def copies():
        return [op for op in _aten_ops(lambda: layer(torch.randn(3, 12))) if op in ("clone", "copy_")]

    with torch.no_grad():
        first, again = len(copies()), len(copies())
        assert first == again + 1  # the operand copy is made once; the path's own layout copies, on every call
        check()
        layer.a.mul_(-2)
        assert len(copies()) == first  # the factor changed in place: prepared again
        check()
        layer.b.data = torch.randn(2, 5, 4)
        check()
        layer.bias = None
        check()
        for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            x = torch.randn(5, 12)
            twin.a.mul_(3)
            torch.testing.assert_close(twin(x), x @ twin.to_dense().T, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer(x), x @ layer.to_dense().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["dense", "b_first"])
def test_inference_caches_never_mistake_a_new_factor_at_a_freed_address(path):
    """torch.func.functional_call passes new factor tensors on every call: same size, version 0, and often the
    address of the previous call's freed ones. The caches pin the storages their keys name, so each call sees its
    own factors; an invalid forced path is a clear error there too."""
    from torch.func import functional_call

    layer = KronLinear(256, 256, (16, 16), rank=4, path=path, bias=False).eval()
    x, b = torch.randn(2, 256), torch.randn(4, 16, 16)
    with torch.no_grad():
        for _ in range(20):
            a = torch.randn(4, 16, 16)
            want = x @ kron_sum(a, b).T
            torch.testing.assert_close(functional_call(layer, {"a": a, "b": b}, (x,)), want, rtol=1e-4, atol=1e-4)
            del a
        layer.path = "bogus"
        with pytest.raises(ValueError, match="bogus"):
            layer(x)


@pytest.mark.parametrize("path", PATHS)
def test_factors_that_cannot_key_a_cache_run_uncached(path):
    """Factors without a version counter (a layer made in inference mode) or without storage (torch.func.vmap over the
    parameters of an ensemble, in eval mode without autograd) cannot key the inference caches: each call builds what
    it runs, and gives the layer's function."""
    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(0)
    x = torch.randn(3, 12)
    with torch.inference_mode():
        layer = KronLinear(12, 20, (4, 3), rank=2, path=path).eval()
        for _ in range(2):
            torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias, rtol=1e-5, atol=1e-5)
            layer.a.mul_(-2)  # in place, with no version counter to tell
    models = [KronLinear(12, 20, (4, 3), rank=2, path=path).eval() for _ in range(3)]
    params, buffers = stack_module_state(models)
    with torch.no_grad():
        out = vmap(lambda p, b: functional_call(models[0], (p, b), (x,)))(params, buffers)
    for got, model in zip(out, models, strict=True):
        torch.testing.assert_close(got, x @ model.to_dense().T + model.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["a", "b", "bias"])
def test_torch_prune_on_a_factor_or_the_bias(name):
    """torch.nn.utils.prune replaces a parameter by an attribute recomputed before every call (``name``_orig · mask):
    training and inference calls both use the pruned tensor, and eval() lays out what is still a parameter."""
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    layer = KronLinear(12, 20, (4, 3), rank=2)
    prune.l1_unstructured(layer, name, amount=0.5)
    x = torch.randn(5, 12)
    for mode in (True, False, True):
        layer.train(mode)
        with torch.set_grad_enabled(mode):
            want = x @ layer.to_dense().T + layer.bias
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    assert (getattr(layer, name) == 0).sum() == getattr(layer, name).numel() // 2


def test_a_layer_keeps_plans_and_prepared_calls_for_a_bounded_number_of_input_sizes(monkeypatch):
    """A server sees every prompt length: the per-size plans and prepared inference calls stay bounded (the earliest
    added dropped first), every call still gives the layer's function, and a recent size is served from the cache."""
    from kronfact import layer as layer_module

    monkeypatch.setattr(layer_module, "_SIZES_KEPT", 8)
    layer = KronLinear(12, 20, (4, 3), rank=2).eval()
    planned = []
    choose = layer.choose_path
    monkeypatch.setattr(layer, "choose_path", lambda *a, **k: planned.append(a[0]) or choose(*a, **k))
    with torch.no_grad():
        for tokens in range(1, 30):
            x = torch.randn(tokens, 12)
            torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias, rtol=1e-5, atol=1e-5)
            assert len(layer._plans) <= 8 and len(layer._inference[1]) <= 8
        assert planned == list(range(1, 30))
        assert [key[0] for key in layer._plans] == list(range(22, 30))  # the earliest added were dropped
        assert list(layer._inference[1]) == [12 * tokens for tokens in range(22, 30)]
        layer(torch.randn(29, 12))  # kept: no new plan
        layer(torch.randn(1, 12))  # dropped long ago: planned again
    assert planned[-1] == 1 and len(planned) == 30


def test_plan_cache_follows_token_count_grad_mode_and_forced_path():
    """Plans are cached per (tokens, dtype, device, grad mode); a forced path overrides the cache."""
    layer = KronLinear(768, 3072, (768, 768), rank=1).eval()  # Krony-PT 81M c_fc: A-first pays at any size
    for tokens in (1, 7, 1):
        x = torch.randn(tokens, 768)
        with torch.no_grad():
            y = layer(x)
        torch.testing.assert_close(y, x @ layer.to_dense().T + layer.bias, rtol=1e-4, atol=1e-4)
        layer(x).sum().backward()  # the grad-mode entry of the same token count
    assert {k[0] for k in layer._plans} == {1, 7} and {k[3] for k in layer._plans} == {True, False}
    x = torch.randn(1, 768)
    with torch.no_grad():
        planned = _aten_ops(lambda: layer(x))
        layer.path = "dense"
        forced = _aten_ops(lambda: layer(x))
    assert planned != forced  # the forced path ran, not the cached plan
