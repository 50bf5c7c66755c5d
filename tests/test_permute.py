"""Permutation search (never worse, identity on Kronecker sums), KronLinear gathers, folding."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kronfact.calibrate import calibrated_decompose, calibrated_error
from kronfact.kron import KronFactors, decompose, kron_sum
from kronfact.layer import PATHS, KronLinear
from kronfact.permute import fold_permutations, permuted_decompose


@st.composite
def problem(draw, max_dim=6):
    m1, n1, m2, n2 = (draw(st.integers(1, max_dim)) for _ in range(4))
    rank = draw(st.integers(1, min(m1 * n1, m2 * n2, 3)))
    return m1, n1, m2, n2, rank, draw(st.integers(0, 2**31))


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@given(case=problem())
@settings(max_examples=40, deadline=None)
def test_permuted_error_never_exceeds_the_unpermuted_one(case):
    m1, n1, m2, n2, rank, seed = case
    w = _randn(m1 * m2, n1 * n2, seed=seed)
    result = permuted_decompose(w, (m1, n1), rank, iters=4)
    plain = decompose(w, (m1, n1), rank)
    assert result.rel_error <= plain.rel_error + 1e-12
    assert all(later <= earlier for earlier, later in zip(result.history, result.history[1:], strict=False))
    assert result.history[0] == pytest.approx(plain.rel_error, abs=1e-12)
    # the reported error is the error of the documented reconstruction against the original weight
    measured = float(torch.linalg.norm(w - result.to_dense()) / torch.linalg.norm(w))
    assert measured == pytest.approx(result.rel_error, abs=1e-9)
    torch.testing.assert_close(result.to_layer(bias=None).to_dense(), result.to_dense())
    for perm, size in ((result.in_perm, n1 * n2), (result.out_perm, m1 * m2)):
        assert torch.equal(torch.sort(perm).values, torch.arange(size))


@given(case=problem())
@settings(max_examples=25, deadline=None)
def test_permuted_calibrated_fit_is_never_worse_than_the_unpermuted_one(case):
    m1, n1, m2, n2, rank, seed = case
    w = _randn(m1 * m2, n1 * n2, seed=seed)
    x = _randn(3 * n1 * n2, n1 * n2, seed=seed + 1) @ _randn(n1 * n2, n1 * n2, seed=seed + 2)
    c = x.T @ x / len(x)
    result = permuted_decompose(w, (m1, n1), rank, iters=3, moment=c, damping=0.0)
    as_factors = KronFactors(result.to_dense()[None], w.new_ones(1, 1, 1), 0.0, "dense")  # W̃ ⊗ [1]
    unpermuted = calibrated_decompose(w, c, (m1, n1), rank, damping=0.0)
    assert calibrated_error(w, as_factors, c) <= calibrated_error(w, unpermuted, c) + 1e-9
    measured = float(torch.linalg.norm(w - result.to_dense()) / torch.linalg.norm(w))
    assert measured == pytest.approx(result.rel_error, abs=1e-9)


@given(case=problem())
@settings(max_examples=40, deadline=None)
def test_a_kronecker_sum_keeps_identity_permutations(case):
    m1, n1, m2, n2, rank, seed = case
    w = kron_sum(_randn(rank, m1, n1, seed=seed), _randn(rank, m2, n2, seed=seed + 1))
    result = permuted_decompose(w, (m1, n1), rank, iters=5)
    assert result.is_identity
    assert result.rel_error < 1e-6
    assert result.to_layer().in_perm is None and result.to_layer().out_perm is None


def test_the_search_improves_a_scrambled_kronecker_product():
    # rows of W grouped in blocks of 4 scaled copies (B is 4×1), scrambled: the search must do better
    a, b = _randn(1, 32, 16, seed=0), _randn(1, 4, 1, seed=1)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(2))
    w = kron_sum(a, b)[perm]
    result = permuted_decompose(w, (32, 16), 1, iters=10)
    assert result.rel_error < 0.9 * decompose(w, (32, 16), 1).rel_error
    assert not result.is_identity


@st.composite
def permuted_layer(draw):
    m1, n1, m2, n2, rank, seed = draw(problem())
    lead = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    return m1, n1, m2, n2, rank, seed, lead, draw(st.booleans()), draw(st.booleans()), draw(st.booleans())


def _permuted(m1, n1, m2, n2, rank, seed, bias, use_in, use_out, path):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = KronLinear(n1 * n2, m1 * m2, (m1, n1), rank, bias=bias, dtype=torch.float64, path=path)
    return layer.set_permutations(torch.randperm(n1 * n2, generator=g) if use_in else None,
                                  torch.randperm(m1 * m2, generator=g) if use_out else None)


@pytest.mark.parametrize("path", PATHS)
@given(case=permuted_layer())
@settings(max_examples=20, deadline=None)
def test_permuted_layer_equals_its_dense_equivalent_forward_and_backward(path, case):
    m1, n1, m2, n2, rank, seed, lead, bias, use_in, use_out = case
    layer = _permuted(m1, n1, m2, n2, rank, seed, bias, use_in, use_out, path)
    x = _randn(*lead, n1 * n2, seed=seed + 1).requires_grad_()
    upstream = _randn(*lead, m1 * m2, seed=seed + 2)
    (layer(x) * upstream).sum().backward()

    # reference: W̃[o, in_perm[j]] = K[out_perm[o], j], built entry by entry from the definition
    a, b = layer.a.detach().clone().requires_grad_(), layer.b.detach().clone().requires_grad_()
    k = sum(torch.kron(a[i], b[i]) for i in range(rank))
    in_perm = layer.in_perm if use_in else torch.arange(n1 * n2)
    out_perm = layer.out_perm if use_out else torch.arange(m1 * m2)
    w = torch.stack([torch.stack([k[out_perm[o], (in_perm == c).nonzero()[0, 0]] for c in range(n1 * n2)])
                     for o in range(m1 * m2)])
    x2 = x.detach().clone().requires_grad_()
    bias2 = layer.bias.detach().clone().requires_grad_() if bias else None
    (nn.functional.linear(x2, w, bias2) * upstream).sum().backward()
    torch.testing.assert_close(layer.to_dense(), w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.to_linear()(x2), nn.functional.linear(x2, w, bias2), rtol=1e-9, atol=1e-9)
    for got, want in [(x.grad, x2.grad), (layer.a.grad, a.grad), (layer.b.grad, b.grad)] + (
            [(layer.bias.grad, bias2.grad)] if bias else []):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    with torch.no_grad():  # eval mode without autograd: the cached dense weight or operands, permuted alike
        torch.testing.assert_close(layer.eval()(x), nn.functional.linear(x, w, bias2), rtol=1e-9, atol=1e-9)


def test_permutations_are_buffers_that_round_trip_through_state_dict():
    layer = _permuted(4, 3, 5, 4, 2, 0, True, True, True, "auto")
    state = layer.state_dict()
    assert torch.equal(state["in_perm"], layer.in_perm) and torch.equal(state["out_perm"], layer.out_perm)
    fresh = KronLinear(12, 20, (4, 3), 2).double()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict(state)
    fresh.set_permutations(torch.arange(12), torch.arange(20)).load_state_dict(state)
    x = _randn(3, 12, seed=1)
    torch.testing.assert_close(fresh(x), layer(x))
    assert "in_perm=True, out_perm=True" in repr(layer)
    assert "perm" not in repr(KronLinear(12, 20, (4, 3)))


def test_eval_cache_follows_a_permutation_change():
    layer = _permuted(4, 3, 5, 4, 2, 0, True, True, True, "dense").eval()
    x = _randn(3, 12, seed=1)
    with torch.no_grad():
        first = layer(x)
        layer.set_permutations(layer.in_perm.flip(0), layer.out_perm)
        torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)
    assert not torch.allclose(first, layer(x))


@pytest.mark.slow
def test_permuted_layers_compile_without_graph_breaks():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        KronLinear(32, 64, (8, 8), 2, path="a_first").set_permutations(torch.randperm(32, generator=g),
                                                                        torch.randperm(64, generator=g)),
        nn.GELU(),
        KronLinear(64, 32, (8, 8), 2, path="b_first").set_permutations(torch.randperm(64, generator=g)),
    )
    x = torch.randn(2, 7, 32)
    eager = model(x)
    out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("bad,message", [
    (torch.tensor([0, 1, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11]), "not a permutation"),
    (torch.arange(11), r"shape \(12,\)"),
    (torch.arange(12.0), "integer tensor"),
])
def test_a_bad_permutation_is_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        KronLinear(12, 20, (4, 3)).set_permutations(in_perm=bad)


class _MLP(nn.Module):
    def __init__(self, c_fc: nn.Module, c_proj: nn.Module):
        super().__init__()
        self.c_fc, self.act, self.c_proj = c_fc, nn.GELU(), c_proj

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


def _mlp_with_permutations(consumer: str) -> nn.Module:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 16, dtype=torch.float64)
    fit = permuted_decompose(weight, (8, 4), 2, iters=3)
    c_fc = KronLinear.from_factors(fit.factors, torch.randn(48, dtype=torch.float64),
                                   in_perm=torch.randperm(16, generator=g), out_perm=torch.randperm(48, generator=g))
    if consumer == "kron":
        c_proj = KronLinear(48, 16, (4, 8), 2, dtype=torch.float64).set_permutations(torch.randperm(48, generator=g))
    elif consumer == "linear":
        c_proj = nn.Linear(48, 16, dtype=torch.float64)
    else:
        conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
        c_proj = conv1d(16, 48).double()
        nn.init.normal_(c_proj.weight)
    return nn.Sequential(_MLP(c_fc, c_proj))


@pytest.mark.parametrize("consumer", ["kron", "linear", "conv1d"])
def test_folding_an_output_permutation_into_the_next_layer_is_exact(consumer):
    model = _mlp_with_permutations(consumer)
    x = _randn(5, 16, seed=3)
    before = model(x)
    assert fold_permutations(model) == [("0.c_fc", "0.c_proj")]
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    assert model[0].c_fc.out_perm is None and model[0].c_fc.in_perm is not None
    assert fold_permutations(model) == []  # nothing left to fold


def test_folding_validates_before_changing_anything():
    model = _mlp_with_permutations("kron")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="must be a KronLinear"):
        fold_permutations(model, [("0.c_fc", "0.c_proj"), ("0.act", "0.c_proj")])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_permuted_gpt2_folds_and_merges_back_exactly():
    transformers = pytest.importorskip("transformers")
    from kronfact.io import merge
    from kronfact.modules import is_conv1d, linear_weight

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=8, vocab_size=32)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, 32, (2, 8))
    for i in range(2):
        for name, shape_a in (("c_fc", (16, 4)), ("c_proj", (4, 16))):
            module = model.transformer.h[i].mlp.get_submodule(name)
            assert is_conv1d(module)
            fit = permuted_decompose(linear_weight(module).detach(), shape_a, 1, iters=3)
            assert not fit.is_identity
            model.transformer.h[i].mlp.set_submodule(name, fit.to_layer(module.bias.detach(), orientation="conv1d"))
    with torch.no_grad():
        compressed = model(ids).logits
        assert len(fold_permutations(model)) == 2
        folded = model(ids).logits
        merged = merge(model)(ids).logits
    torch.testing.assert_close(folded, compressed, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(merged, compressed, rtol=1e-10, atol=1e-10)
