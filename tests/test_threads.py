"""kronfact.threads: independent decompositions side by side, in order, with the thread count restored."""

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kronfact
from kronfact.budget import error_curves
from kronfact.threads import lapack, parallel_map


@contextlib.contextmanager
def threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@given(st.lists(st.integers(-100, 100), max_size=12), st.integers(1, 4))
@settings(max_examples=30, deadline=None)
def test_parallel_map_is_map_in_order_and_restores_the_threads(items, n):
    with threads(n):
        seen = []
        got = list(parallel_map(lambda x: (seen.append(torch.get_num_threads()), x * x)[1], items))
        assert got == [x * x for x in items]
        assert torch.get_num_threads() == n
        if n > 1 and len(items) > 1:
            assert set(seen) == {1}  # every worker runs one intra-op thread


def test_parallel_map_raises_the_first_error_in_order_and_restores_the_threads():
    def fn(x):
        if x >= 3:
            raise ValueError(f"bad {x}")
        return x

    with threads(2):
        results = parallel_map(fn, range(8))
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="bad 3"):
            next(results)
        assert torch.get_num_threads() == 2
        with contextlib.closing(parallel_map(fn, range(2))) as early:  # closed before the end
            assert next(early) == 0
        assert torch.get_num_threads() == 2


def test_lapack_runs_one_thread_and_restores():
    with threads(2):
        assert lapack(lambda x: torch.get_num_threads(), torch.zeros(1)) == 1
        assert torch.get_num_threads() == 2


@given(st.integers(1, 9), st.integers(0, 2**31))
@settings(max_examples=15, deadline=None)
def test_error_curves_are_the_same_on_one_thread_and_two(count, seed):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(24, 18, generator=g) for _ in range(count)]
    with threads(1):
        serial = error_curves(weights, (4, 3))
    with threads(2):
        parallel = error_curves(weights, (4, 3))
    for a, b in zip(serial, parallel, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:compress\\(\\) without calibration")
def test_compress_fits_the_same_layers_on_one_thread_and_two():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(*(nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32)) for _ in range(3)))

    fitted = []
    for n in (1, 2):
        with threads(n):
            m = model()
            report = kronfact.compress(m, ["0", "2"], ratio=0.5, progress=False)
            fitted.append((report, m.state_dict()))
    (r1, s1), (r2, s2) = fitted
    assert len(r1.layers) == 6
    assert [(row.shape_a, row.rank) for row in r1.layers] == [(row.shape_a, row.rank) for row in r2.layers]
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=0, atol=1e-6)
