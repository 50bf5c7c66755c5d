"""The budget solver: feasible, optimal (brute force), monotone in the budget, within 1%; curves and options."""

import itertools
import math
import re

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kronfact.budget import Option, candidate_shapes, error_curve, error_curves, layer_options, solve
from kronfact.kron import decompose, factor_shapes, max_rank


@st.composite
def instance(draw, max_layers=4, max_options=4):
    """Small arbitrary multiple-choice knapsacks (options need not be sorted, convex or even sensible)."""
    layers = draw(st.integers(1, max_layers))
    options = [[Option((1, 1), r, draw(st.integers(0, 40)), draw(st.floats(0, 1)))
                for r in range(draw(st.integers(1, max_options)))] for _ in range(layers)]
    weights = [draw(st.floats(0.1, 10)) for _ in range(layers)]
    return options, draw(st.integers(0, 50)), weights


def brute_force(options, budget, fixed, weights):
    """Least objective over every combination that fits (None if none fits)."""
    best = None
    for combo in itertools.product(*options):
        if fixed + sum(o.params for o in combo) <= budget:
            cost = sum(w * o.error**2 for w, o in zip(weights, combo, strict=True))
            best = cost if best is None else min(best, cost)
    return best


def bounds(options, fixed):
    return fixed + sum(min(o.params for o in opts) for opts in options), \
        fixed + sum(max(o.params for o in opts) for opts in options)


def reachable_budget(data, options, fixed):
    smallest, largest = bounds(options, fixed)
    return data.draw(st.integers(smallest, math.floor(largest / 0.99)))


@given(instance(), st.data())
@settings(max_examples=300, deadline=None)
def test_solution_is_feasible_and_optimal_against_brute_force(case, data):
    options, fixed, weights = case
    budget = reachable_budget(data, options, fixed)
    sol = solve(options, budget, fixed, weights)
    assert all(o in opts for o, opts in zip(sol.choice, options, strict=True))
    assert sol.total == fixed + sum(o.params for o in sol.choice) <= budget
    cost = sum(w * o.error**2 for w, o in zip(weights, sol.choice, strict=True))
    assert sol.objective == pytest.approx(cost, abs=1e-12)
    assert sol.objective == pytest.approx(brute_force(options, budget, fixed, weights), abs=1e-12)


@given(instance(), st.data())
@settings(max_examples=150, deadline=None)
def test_objective_is_monotone_in_the_budget(case, data):
    options, fixed, weights = case
    small, large = sorted((reachable_budget(data, options, fixed), reachable_budget(data, options, fixed)))
    assert solve(options, large, fixed, weights).objective <= solve(options, small, fixed, weights).objective + 1e-12


@given(instance(), st.data())
@settings(max_examples=100, deadline=None)
def test_an_unreachable_budget_states_the_smallest_and_largest_totals(case, data):
    options, fixed, weights = case
    smallest, largest = bounds(options, fixed)
    budget = data.draw(st.one_of(st.integers(-5, smallest - 1), st.integers(math.floor(largest / 0.99) + 1, 10**6)))
    with pytest.raises(ValueError, match=re.escape(f"smallest reachable total is {smallest:,} and the largest "
                                                   f"{largest:,}")):
        solve(options, budget, fixed, weights)


@st.composite
def realistic(draw):
    """Layers with Kronecker error curves of decaying spectra, budget anywhere in the reachable range."""
    layers, fixed = [], draw(st.integers(10000, 30000))
    for _ in range(draw(st.integers(1, 5))):
        out_f, in_f = draw(st.sampled_from([(16, 16), (32, 8), (24, 12), (64, 16)]))
        curves = {}
        for shape_a in candidate_shapes(out_f, in_f):
            shape_b = (out_f // shape_a[0], in_f // shape_a[1])
            decay = draw(st.floats(0.0, 0.5))
            sigma = torch.tensor([math.exp(-decay * k) for k in range(max_rank(shape_a, shape_b))], dtype=torch.float64)
            errors = torch.cat([sigma.square().flip(0).cumsum(0).flip(0), sigma.new_zeros(1)]).sqrt()
            curves[shape_a] = errors / errors[0]
        layers.append(layer_options(curves, out_f, in_f))
    smallest, largest = bounds(layers, fixed)
    return layers, fixed, draw(st.integers(smallest, largest))


@given(realistic())
@settings(max_examples=60, deadline=None)
def test_total_is_within_one_percent_when_rank_steps_are_small(case):
    layers, fixed, budget = case
    sol = solve(layers, budget, fixed)
    step = max(o.params // o.rank for opts in layers for o in opts if o.rank)
    assume(step <= 0.008 * budget)  # one more Kronecker term (plus the grid's ≤ 0.2%) is below 1% of the budget
    assert 0.99 * budget <= sol.total <= budget


def test_a_large_instance_uses_the_grid_and_stays_feasible_and_close():
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(24):
        sigma = torch.rand(1536, generator=gen, dtype=torch.float64).sort(descending=True).values ** 4
        errors = torch.cat([sigma.square().flip(0).cumsum(0).flip(0), sigma.new_zeros(1)]).sqrt()
        layers.append(layer_options({(48, 32): errors / errors[0]}, 3072, 768))
    dense = 24 * 3072 * 768
    for frac in (0.1, 0.37, 0.8):
        budget = 40_000_000 + int(frac * dense)
        sol = solve(layers, budget, fixed=40_000_000)
        assert 0.99 * budget <= sol.total <= budget
        assert sol.total >= budget - 0.003 * frac * dense - 3072  # grid loss ≤ SLACK of the spare, + one step


def test_weights_shift_parameters_toward_the_weighted_layer():
    curve = torch.linspace(1, 0, 17, dtype=torch.float64)  # A (4, 4), B (4, 4): 32 parameters per term
    layers = [layer_options({(4, 4): curve}, 16, 16, keep_dense=False) for _ in range(2)]
    even = solve(layers, 8 * 32, 0)
    tilted = solve(layers, 8 * 32, 0, weights=[1.0, 20.0])
    assert even.choice[0].rank == even.choice[1].rank
    assert tilted.choice[1].rank > tilted.choice[0].rank


@given(out_f=st.integers(1, 600), in_f=st.integers(1, 600), balanced=st.integers(1, 8))
@settings(max_examples=150, deadline=None)
def test_candidate_shapes(out_f, in_f, balanced):
    shapes = candidate_shapes(out_f, in_f, balanced)
    valid = {s.shape_a for s in factor_shapes(out_f, in_f)}
    assert set(shapes) <= valid and len(set(shapes)) == len(shapes) <= balanced + 1
    if min(out_f, in_f) >= 2:
        assert shapes[0] == (out_f, 1)  # plain low rank
    root = math.sqrt(out_f * in_f)
    for m1, n1 in shapes[1:]:
        assert root / 2 <= m1 * n1 <= 2 * root and min(m1 * n1, out_f * in_f // (m1 * n1)) >= 2


@st.composite
def weight_and_shape(draw):
    m1, n1, m2, n2 = (draw(st.integers(1, 5)) for _ in range(4))
    seed = draw(st.integers(0, 2**31))
    w = torch.randn(m1 * m2, n1 * n2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return w, (m1, n1)


@given(weight_and_shape(), st.sampled_from(["vanloan", "prune"]), st.data())
@settings(max_examples=80, deadline=None)
def test_error_curve_is_the_error_decompose_achieves(case, init, data):
    w, shape_a = case
    curve = error_curve(w, shape_a, init)
    assert curve[0] == pytest.approx(1.0) and bool((curve[1:] <= curve[:-1] + 1e-12).all())
    rank = data.draw(st.integers(1, len(curve) - 1))
    assert float(curve[rank]) == pytest.approx(decompose(w, shape_a, rank, init).rel_error, abs=1e-9)


def test_layer_options_cap_ranks_below_dense_and_pin():
    curve = torch.linspace(1, 0, 17, dtype=torch.float64)  # shape (4, 4) of a 16×16 layer: 32 params per term
    opts = layer_options({(4, 4): curve}, 16, 16)
    assert [o.rank for o in opts if not o.dense] == list(range(1, 8))  # 8 terms = 256 params = dense
    assert opts[-1] == Option(None, 0, 256, 0.0)
    assert [o.rank for o in layer_options({(4, 4): curve}, 16, 16, max_rank=3)] == [1, 2, 3, 0]
    assert layer_options({(4, 4): curve}, 16, 16, rank=12) == [Option((4, 4), 12, 384, float(curve[12]))]
    with pytest.raises(ValueError, match="rank=17 is above the maximum rank"):
        layer_options({(4, 4): curve}, 16, 16, rank=17)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 5),
       st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_batched_error_curves_equal_single_ones_and_the_float64_curve(m1, n1, m2, n2, count, seed):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(m1 * m2, n1 * n2, generator=g) for _ in range(count)]
    batched = error_curves(weights, (m1, n1))
    for w, curve in zip(weights, batched, strict=True):
        torch.testing.assert_close(curve, error_curve(w, (m1, n1)), rtol=0, atol=1e-12)
        torch.testing.assert_close(curve, error_curve(w.double(), (m1, n1)), rtol=0, atol=1e-6)
