"""Properties of the Kronecker math: exact recovery, the Van Loan error identity, pruning, inputs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kronfact
from kronfact.kron import rearrange, spectrum_errors, unrearrange

dims = st.integers(1, 5)


def _kron_sum_explicit(a, b):
    return sum(torch.kron(a[i], b[i]) for i in range(a.shape[0]))


@st.composite
def kron_problem(draw, max_rank=None):
    m1, n1, m2, n2 = draw(dims), draw(dims), draw(dims), draw(dims)
    limit = min(m1 * n1, m2 * n2)
    r = draw(st.integers(1, limit if max_rank is None else min(limit, max_rank)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    a = torch.randn(r, m1, n1, generator=g, dtype=torch.float64)
    b = torch.randn(r, m2, n2, generator=g, dtype=torch.float64)
    return a, b


@st.composite
def weight_and_shape(draw):
    m1, n1, m2, n2 = draw(dims), draw(dims), draw(dims), draw(dims)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    return torch.randn(m1 * m2, n1 * n2, generator=g, dtype=torch.float64), (m1, n1), (m2, n2)


@given(kron_problem())
@settings(max_examples=60, deadline=None)
def test_exact_recovery_of_a_kronecker_sum(problem):
    a, b = problem
    w = _kron_sum_explicit(a, b)
    f = kronfact.decompose(w, a.shape[1:], rank=a.shape[0])
    assert f.a.shape == a.shape and f.b.shape == b.shape
    torch.testing.assert_close(f.to_dense(), w, atol=1e-9 * max(1.0, float(w.abs().max())), rtol=1e-9)
    assert f.rel_error < 1e-7


@given(weight_and_shape())
@settings(max_examples=40, deadline=None)
def test_error_identity_at_every_rank(case):
    w, shape_a, shape_b = case
    sigma = kronfact.kron_spectrum(w, shape_a)
    tails = spectrum_errors(sigma)
    norm = float(w.norm())
    previous = math.inf
    for r in range(1, len(sigma) + 1):
        f = kronfact.decompose(w, shape_a, rank=r)
        measured = float(torch.linalg.norm(w - f.to_dense()))
        assert measured == pytest.approx(float(tails[r]), abs=1e-9 * norm)
        assert f.rel_error * norm == pytest.approx(measured, abs=1e-9 * norm)
        assert f.rel_error <= previous + 1e-12  # non-increasing in rank
        previous = f.rel_error
    assert previous < 1e-9  # zero at full rank


@given(weight_and_shape())
@settings(max_examples=40, deadline=None)
def test_rearrangement_round_trip_and_rank_one_structure(case):
    w, shape_a, shape_b = case
    torch.testing.assert_close(unrearrange(rearrange(w, shape_a), shape_a, shape_b), w, rtol=0, atol=0)
    a = torch.arange(shape_a[0] * shape_a[1], dtype=w.dtype).reshape(shape_a) + 1
    b = torch.arange(shape_b[0] * shape_b[1], dtype=w.dtype).reshape(shape_b) - 2
    torch.testing.assert_close(rearrange(torch.kron(a, b), shape_a), torch.outer(a.flatten(), b.flatten()))


def test_spectrum_matches_svd_of_the_rearrangement():
    w = torch.randn(12, 20, dtype=torch.float64)
    sigma = kronfact.kron_spectrum(w, (3, 4))
    torch.testing.assert_close(sigma, torch.linalg.svdvals(rearrange(w, (3, 4))))
    assert torch.all(sigma[:-1] >= sigma[1:])


@given(weight_and_shape(), st.floats(-50, 50).filter(lambda c: abs(c) > 1e-3))
@settings(max_examples=40, deadline=None)
def test_decompose_scales_with_the_weight(case, c):
    w, shape_a, _ = case
    r = min(2, kronfact.kron.max_rank(shape_a, (w.shape[0] // shape_a[0], w.shape[1] // shape_a[1])))
    f, fc = kronfact.decompose(w, shape_a, r), kronfact.decompose(c * w, shape_a, r)
    torch.testing.assert_close(fc.to_dense(), c * f.to_dense(), atol=1e-8 * abs(c) * float(w.abs().max()), rtol=1e-7)
    assert fc.rel_error == pytest.approx(f.rel_error, abs=1e-9)
    # balanced factors scale by √|c| each
    torch.testing.assert_close(fc.a.norm(dim=(1, 2)), math.sqrt(abs(c)) * f.a.norm(dim=(1, 2)), rtol=1e-6, atol=1e-9)


@given(weight_and_shape())
@settings(max_examples=40, deadline=None)
def test_vanloan_factors_are_balanced_with_deterministic_signs(case):
    w, shape_a, shape_b = case
    r = kronfact.kron.max_rank(shape_a, shape_b)
    f = kronfact.decompose(w, shape_a, r)
    sigma = kronfact.kron_spectrum(w, shape_a)
    torch.testing.assert_close(f.a.norm(dim=(1, 2)), f.b.norm(dim=(1, 2)), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(f.a.norm(dim=(1, 2)) ** 2, sigma[:r], rtol=1e-7, atol=1e-9)
    flat = f.a.reshape(r, -1)
    pivot = flat.gather(1, flat.abs().argmax(1, keepdim=True))
    assert torch.all(pivot >= 0)
    g = kronfact.decompose(w, shape_a, r)
    assert torch.equal(f.a, g.a) and torch.equal(f.b, g.b)


@given(weight_and_shape(), st.data())
@settings(max_examples=40, deadline=None)
def test_prune_error_is_the_norm_of_the_dropped_slices(case, data):
    w, (m1, n1), (m2, n2) = case
    r = data.draw(st.integers(1, m2 * n2))
    f = kronfact.decompose(w, (m1, n1), r, init="prune")
    norms = {(p, q): float(w[p::m2, q::n2].norm()) for p in range(m2) for q in range(n2)}
    kept = set()
    for i in range(r):
        (p,), (q,) = torch.nonzero(f.b[i], as_tuple=True)
        assert float(f.b[i].sum()) == 1.0  # one-hot
        torch.testing.assert_close(f.a[i], w[int(p)::m2, int(q)::n2], rtol=0, atol=0)  # the slice, as is
        kept.add((int(p), int(q)))
    assert sorted(norms[k] for k in kept) == sorted(norms.values())[len(norms) - r:]  # the largest slices
    dropped = math.sqrt(sum(v**2 for k, v in norms.items() if k not in kept))
    assert f.rel_error * float(w.norm()) == pytest.approx(dropped, abs=1e-9)
    assert float(torch.linalg.norm(w - f.to_dense())) == pytest.approx(dropped, abs=1e-9)


def test_prune_reproduces_krony_pt_every_other_row_init():
    """Krony-PT 95M: c_fc (768×3072, Conv1D) → A = c_fc[0::2], B = [[1],[0]]; ours is transposed."""
    c_fc = torch.randn(16, 48)  # Conv1D orientation (in, out), small stand-in
    w = c_fc.T  # nn.Linear orientation (out, in)
    f = kronfact.decompose(w, (48, 8), rank=1, init="prune", prune_index=[(0, 0)])
    torch.testing.assert_close(f.a[0].T, c_fc[0::2], rtol=0, atol=0)
    torch.testing.assert_close(f.b[0].T, torch.tensor([[1.0], [0.0]]), rtol=0, atol=0)


def _decaying(out_f, in_f, shape_a, seed, decay=0.7):
    """A weight whose Kronecker spectrum decays geometrically, plus noise."""
    g = torch.Generator().manual_seed(seed)
    m1, n1 = shape_a
    m2, n2 = out_f // m1, in_f // n1
    k = min(m1 * n1, m2 * n2, 30)
    a = torch.randn(k, m1, n1, generator=g) * (decay ** torch.arange(k))[:, None, None]
    b = torch.randn(k, m2, n2, generator=g)
    return kronfact.kron.kron_sum(a, b) + 1e-3 * torch.randn(out_f, in_f, generator=g)


@pytest.mark.parametrize("shape_a,rank", [((32, 16), 1), ((24, 32), 4), ((64, 64), 8)])
def test_randomized_svd_is_within_tolerance_of_exact(shape_a, rank):
    w = _decaying(768, 1024, shape_a, seed=rank)
    exact = kronfact.decompose(w, shape_a, rank, svd="exact")
    fast = kronfact.decompose(w, shape_a, rank, svd="randomized")
    assert fast.rel_error <= exact.rel_error * (1 + 1e-3) + 1e-6
    measured = float(torch.linalg.norm(w.double() - fast.to_dense().double()) / w.double().norm())
    assert fast.rel_error == pytest.approx(measured, rel=1e-3, abs=1e-6)


def test_random_init_has_the_weights_scale_and_its_error_is_measured():
    w = torch.randn(64, 48) * 0.05
    f = kronfact.decompose(w, (8, 6), rank=3, init="random", generator=torch.Generator().manual_seed(0))
    assert f.to_dense().std().item() == pytest.approx(0.05, rel=0.35)
    assert f.rel_error == pytest.approx(float(torch.linalg.norm(w - f.to_dense()) / w.norm()), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_keep_their_dtype(dtype):
    a, b = torch.randn(2, 4, 6), torch.randn(2, 5, 3)
    w = kronfact.kron.kron_sum(a, b).to(dtype)
    f = kronfact.decompose(w, (4, 6), 2)
    assert f.a.dtype == dtype and f.b.dtype == dtype
    assert f.rel_error < 0.02


def test_factor_shapes_lists_every_valid_split():
    shapes = kronfact.factor_shapes(12, 8)
    assert len(shapes) == 6 * 4  # divisors of 12 × divisors of 8
    for s in shapes:
        (m1, n1), (m2, n2) = s.shape_a, s.shape_b
        assert m1 * m2 == 12 and n1 * n2 == 8 and s.params_per_term == m1 * n1 + m2 * n2
    assert [s.params_per_term for s in shapes] == sorted(s.params_per_term for s in shapes)


@pytest.mark.parametrize(
    "weight,kwargs,message",
    [
        (torch.randn(12, 8), {"shape_a": (5, 2)}, r"shape_a=\(5, 2\) does not divide.*Valid m1: \[1, 2, 3, 4, 6, 12\]"),
        (torch.randn(12, 8), {"shape_a": (3, 2), "rank": 7}, r"rank=7 is above the maximum 6"),
        (torch.randn(12, 8), {"shape_a": (3, 2), "rank": 0}, r"rank must be a positive int"),
        (torch.randn(12, 8), {"shape_a": (3, 2), "init": "svd"}, r"init must be one of"),
        (torch.randn(12, 8), {"shape_a": (3, 2), "init": "prune", "rank": 17}, r"maximum 16"),
        (torch.randn(12, 8), {"shape_a": (3, 2), "init": "prune", "prune_index": [(4, 0)]}, r"outside shape_b"),
        (torch.randn(12, 8), {"shape_a": (3, 2), "init": "prune", "prune_index": [(0, 0), (0, 0)]}, r"repeated"),
        (torch.randn(2, 3, 4), {"shape_a": (1, 1)}, r"must be 2-D"),
        (torch.randn(0, 4), {"shape_a": (1, 1)}, r"is empty"),
        (torch.tensor([[1.0, float("nan")]]), {"shape_a": (1, 1)}, r"NaN or Inf"),
        (torch.ones(4, 4, dtype=torch.int64), {"shape_a": (2, 2)}, r"floating-point dtype"),
        ([[1.0, 2.0]], {"shape_a": (1, 1)}, r"must be a torch.Tensor"),
    ],
)
def test_bad_input_is_a_clear_value_error(weight, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kronfact.decompose(weight, **kwargs)


def test_spectrum_and_factor_shapes_validate_input():
    with pytest.raises(ValueError, match="does not divide"):
        kronfact.kron_spectrum(torch.randn(12, 8), (5, 1))
    with pytest.raises(ValueError, match="positive int"):
        kronfact.factor_shapes(0, 8)


@given(weight_and_shape(), st.data())
@settings(max_examples=40, deadline=None)
def test_float32_gram_route_matches_the_float64_svd(case, data):
    """float32 weights take the float64 Gram eigendecomposition: spectrum, factors and error agree with
    the float64 SVD to float32 resolution."""
    w, shape_a, shape_b = case
    r = data.draw(st.integers(1, kronfact.kron.max_rank(shape_a, shape_b)))
    w32 = w.float()
    scale = float(w.norm())
    exact = kronfact.kron_spectrum(w32.double(), shape_a)
    torch.testing.assert_close(kronfact.kron_spectrum(w32, shape_a).double(), exact, rtol=0, atol=1e-5 * scale)
    f32, f64 = kronfact.decompose(w32, shape_a, r), kronfact.decompose(w32.double(), shape_a, r)
    assert f32.a.dtype == torch.float32
    assert f32.rel_error == pytest.approx(f64.rel_error, abs=1e-5)
    torch.testing.assert_close(f32.to_dense().double(), f64.to_dense(), rtol=0, atol=1e-4 * scale)


def test_lapack_calls_restore_the_thread_count():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kronfact.decompose(torch.randn(64, 48), (8, 6), 3)
        kronfact.kron_spectrum(torch.randn(64, 48), (8, 6))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
