"""Activation-aware factorization: never worse than Van Loan on its objective, exact for Kronecker
moments, monotone refinement; input moments collected by hooks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kronfact.calibrate import (
    calibrated_decompose,
    calibrated_error,
    calibrated_error_curve,
    calibrated_spectrum,
    calibration_errors,
    collect_input_moments,
)
from kronfact.kron import KronFactors, decompose, rearrange, spectrum_errors
from kronfact.layer import KronLinear


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@st.composite
def problem(draw, max_dim=5):
    m1, n1, m2, n2 = (draw(st.integers(1, max_dim)) for _ in range(4))
    rank = draw(st.integers(1, min(m1 * n1, m2 * n2, 3)))
    tokens = draw(st.integers(1, 3 * n1 * n2))  # fewer tokens than inputs too: a singular moment
    return m1, n1, m2, n2, rank, tokens, draw(st.integers(0, 2**31))


def _moment(x):
    return x.T @ x / x.shape[0]


def _damped(c, damping):
    return c + damping * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)


@pytest.mark.parametrize("damping", [0.0, 1e-2])
@given(case=problem())
@settings(max_examples=30, deadline=None)
def test_calibrated_objective_is_never_above_plain_van_loan(damping, case):
    m1, n1, m2, n2, rank, tokens, seed = case
    w = _randn(m1 * m2, n1 * n2, seed=seed)
    # correlated inputs with very unequal scales, as in a trained network
    x = _randn(tokens, n1 * n2, seed=seed + 1) @ _randn(n1 * n2, n1 * n2, seed=seed + 2)
    c = _moment(x)
    plain = decompose(w, (m1, n1), rank)
    objective = _damped(c, damping)  # the objective the fit minimises
    for refine in (0, 2):
        fit = calibrated_decompose(w, c, (m1, n1), rank, damping=damping, refine=refine)
        assert calibrated_error(w, fit, objective) <= calibrated_error(w, plain, objective) + 1e-9
        assert fit.a.shape == (rank, m1, n1) and fit.b.shape == (rank, m2, n2) and fit.init == "calibrated"
        measured = float(torch.linalg.norm(w - fit.to_dense()) / torch.linalg.norm(w))
        assert fit.rel_error == pytest.approx(measured, rel=1e-9, abs=1e-12)


@given(case=problem())
@settings(max_examples=30, deadline=None)
def test_refinement_never_raises_the_objective(case):
    m1, n1, m2, n2, rank, tokens, seed = case
    w = _randn(m1 * m2, n1 * n2, seed=seed)
    c = _moment(_randn(tokens, n1 * n2, seed=seed + 1) @ _randn(n1 * n2, n1 * n2, seed=seed + 2))
    errors = [calibrated_error(w, calibrated_decompose(w, c, (m1, n1), rank, damping=0.0, refine=k), c)
              for k in range(4)]
    # errors are √objective: float64 round-off of ~1e-16 in the objective shows as ~1e-8 near an exact fit
    assert all(later <= earlier + 1e-7 for earlier, later in zip(errors, errors[1:], strict=False))


def _spd(n, seed):
    x = _randn(n + 2, n, seed=seed)
    return x.T @ x + 0.1 * torch.eye(n, dtype=torch.float64)


@given(case=problem(max_dim=4), scale=st.floats(0.01, 100))
@settings(max_examples=30, deadline=None)
def test_the_closed_form_is_the_optimum_when_the_moment_is_a_kronecker_product(case, scale):
    m1, n1, m2, n2, rank, _, seed = case
    w = _randn(m1 * m2, n1 * n2, seed=seed)
    c1, c2 = _spd(n1, seed + 1), _spd(n2, seed + 2)
    c = torch.kron(scale * c1, c2)
    fit = calibrated_decompose(w, c, (m1, n1), rank, damping=0.0, refine=0)
    objective = calibrated_error(w, fit, c) ** 2 * float(((w @ c) * w).sum())

    # 1. the optimum value, independently: Eckart–Young on R(W·(L₁⊗L₂)) for any square roots L
    root = torch.kron(torch.linalg.cholesky(c1), torch.linalg.cholesky(scale * c2))
    tail = spectrum_errors(torch.linalg.svdvals(rearrange(w @ root, (m1, n1))))[rank] ** 2
    assert objective == pytest.approx(float(tail), rel=1e-7, abs=1e-9)

    # 2. no A does better for the closed form's B: the normal equations, built from explicit Kronecker products
    basis = torch.eye(rank * m1 * n1, dtype=torch.float64).reshape(-1, rank, m1, n1)
    design = torch.stack([sum(torch.kron(e[i], fit.b[i]) for i in range(rank)) @ root for e in basis], -1)
    coef = torch.linalg.lstsq(design.reshape(-1, design.shape[-1]), (w @ root).reshape(-1, 1)).solution
    best = (w @ root).reshape(-1) - design.reshape(-1, design.shape[-1]) @ coef[:, 0]
    assert objective <= float(best.square().sum()) * (1 + 1e-7) + 1e-9


@given(case=problem(max_dim=4))
@settings(max_examples=20, deadline=None)
def test_calibrated_spectrum_gives_the_closed_form_error_curve_for_kronecker_moments(case):
    m1, n1, m2, n2, _, _, seed = case
    w = _randn(m1 * m2, n1 * n2, seed=seed)
    c = torch.kron(_spd(n1, seed + 1), _spd(n2, seed + 2))
    sigma = calibrated_spectrum(w, c, (m1, n1), damping=0.0)
    curve = calibrated_error_curve(w, c, (m1, n1), damping=0.0)
    assert curve.shape == (len(sigma) + 1,) and float(curve[0]) == pytest.approx(1.0)
    for rank in range(1, len(sigma) + 1):
        fit = calibrated_decompose(w, c, (m1, n1), rank, damping=0.0, refine=0)
        assert calibrated_error(w, fit, c) == pytest.approx(float(curve[rank]), rel=1e-6, abs=1e-7)


def test_calibration_dtype_device_and_bad_input():
    w = torch.randn(12, 6)
    c = _moment(torch.randn(20, 6)).float()
    fit = calibrated_decompose(w, c, (4, 3), 2)
    assert fit.a.dtype == torch.float32 and fit.a.device == w.device
    with pytest.raises(ValueError, match=r"moment must be the \(6, 6\)"):
        calibrated_decompose(w, torch.eye(5), (4, 3))
    with pytest.raises(ValueError, match="finite"):
        calibrated_decompose(w, torch.full((6, 6), float("nan")), (4, 3))
    with pytest.raises(ValueError, match="refine"):
        calibrated_decompose(w, c, (4, 3), refine=-1)
    with pytest.raises(ValueError, match="does not divide"):
        calibrated_decompose(w, c, (5, 3))
    assert calibrated_error(w, KronFactors(fit.a, fit.b, 0.0, "x"), c) >= 0


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 8), nn.Tanh(), KronLinear(8, 4, (2, 2), 1)

    def forward(self, x, attention_mask=None):
        return self.fc2(self.act(self.fc1(x)))


def test_input_moments_equal_the_moments_of_the_layer_inputs():
    torch.manual_seed(0)
    net = _Net().train()
    batches = [torch.randn(3, 5, 6), torch.randn(2, 6)]
    moments = collect_input_moments(net, ["fc1", "fc2"], batches)
    x = torch.cat([b.reshape(-1, 6) for b in batches])
    with torch.no_grad():
        h = net.act(net.fc1(x))
    torch.testing.assert_close(moments["fc1"], x.T @ x / len(x))
    torch.testing.assert_close(moments["fc2"], h.T @ h / len(h))
    assert net.training and all(p.grad is None for p in net.parameters())
    assert not net.fc1._forward_pre_hooks  # hooks removed


def test_input_moments_leave_out_padding_and_accept_mappings():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    moments = collect_input_moments(net, ["fc1"], [{"x": x, "attention_mask": mask}])
    kept = x[mask.bool()]
    torch.testing.assert_close(moments["fc1"], kept.T @ kept / len(kept))


def test_input_moments_of_a_gpt2_conv1d():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=32)
    model = transformers.GPT2LMHeadModel(config)
    captured = []
    model.transformer.h[0].mlp.c_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, 64)))
    ids = torch.randint(0, 32, (2, 8))
    moments = collect_input_moments(model, ["transformer.h.0.mlp.c_proj"], [ids, (ids[:1],)])
    x = torch.cat(captured)
    torch.testing.assert_close(moments["transformer.h.0.mlp.c_proj"], x.T @ x / len(x))


def test_calibration_errors_give_each_layers_curve_from_its_own_inputs():
    torch.manual_seed(0)
    net = _Net()
    batches = [torch.randn(4, 6)]
    errors = calibration_errors(net, ["fc1", "fc2"], batches)
    moments = collect_input_moments(net, ["fc1", "fc2"], batches)
    for name, shape_a in (("fc1", (4, 3)), ("fc2", (2, 4))):
        weight = net.get_submodule(name).weight if name == "fc1" else net.fc2.to_dense()
        torch.testing.assert_close(errors(name, weight.detach(), shape_a),
                                   calibrated_error_curve(weight.detach(), moments[name], shape_a))
    with pytest.raises(ValueError, match="no calibration moment for 'act'"):
        errors("act", net.fc1.weight, (4, 3))


def test_input_moments_bad_input():
    net = _Net()
    with pytest.raises(ValueError, match="closest: fc1"):
        collect_input_moments(net, ["fc11"], [torch.randn(2, 6)])
    with pytest.raises(ValueError, match="is a Tanh"):
        collect_input_moments(net, ["act"], [torch.randn(2, 6)])
    with pytest.raises(ValueError, match="no calibration tokens"):
        collect_input_moments(net, ["fc1"], [])
