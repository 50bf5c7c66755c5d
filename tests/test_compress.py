"""compress(): in-place surgery on toy MLPs and a tiny GPT-2 / BERT, its report, and every bad input."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from kronfact.budget import error_curve
from kronfact.layer import KronLinear
from kronfact.modules import count_parameters, is_conv1d, linear_weight
from kronfact.surgery import CompressionReport, compress

transformers = pytest.importorskip("transformers")


class MLP(nn.Module):
    def __init__(self, d=16, hidden=64):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Toy(nn.Module):
    """Two residual MLP blocks over an embedding, with a final nn.Linear readout. The embedding's 16,000
    parameters make one Kronecker term of an MLP layer (≤ 80 parameters) < 1% of the model."""

    def __init__(self, d=16, hidden=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(1000, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({"mlp": MLP(d, hidden), "norm": nn.LayerNorm(d)}) for _ in range(2))
        self.out = nn.Linear(d, 4)
        # trained weights are far from white noise: give each layer a decaying spectrum
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    u, _, vh = torch.linalg.svd(m.weight, full_matrices=False)
                    m.weight.copy_(u @ torch.diag(0.7 ** torch.arange(vh.shape[0], dtype=torch.float32)) @ vh)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block["mlp"](block["norm"](x))
        return self.out(x)


IDS = torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(1))


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, snap):
    state, types = snap
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        torch.testing.assert_close(now[k], state[k], rtol=0, atol=0, equal_nan=True)


def mlp_params(model):
    return sum(p.numel() for b in model.blocks for p in b["mlp"].parameters())


@pytest.mark.parametrize("frac", [0.3, 0.6])
def test_budget_on_a_toy_mlp_fits_and_the_report_counts_the_model(frac):
    model = Toy()
    before = count_parameters(model)
    budget = before - round((1 - frac) * mlp_params(model))
    report = compress(model, "mlp.*", budget=budget, progress=False)
    after = count_parameters(model)
    assert (report.params_before, report.params_after) == (before, after)
    assert 0.99 * budget <= after <= budget
    assert report.ratio == after / before and report.budget == budget
    replaced = {n for n, m in model.named_modules() if isinstance(m, KronLinear)}
    assert replaced == {r.name for r in report.layers} and not replaced & set(report.kept_dense)
    assert replaced | set(report.kept_dense) == {f"blocks.{i}.mlp.fc{j}" for i in range(2) for j in (1, 2)}
    for r in report.layers:
        layer = model.get_submodule(r.name)
        assert (layer.shape_a, layer.rank, layer.shape_b) == (r.shape_a, r.rank, r.shape_b)
        assert r.params_after == sum(p.numel() for p in layer.parameters()) < r.params_before
    assert torch.isfinite(model(IDS)).all()


def test_more_budget_gives_less_error_and_closer_outputs():
    base = Toy()
    reference = base(IDS)
    errors, gaps = [], []
    for frac in (0.15, 0.35, 0.7):
        model = copy.deepcopy(base)
        report = compress(model, "mlp.*", ratio=frac, progress=False)
        errors.append(sum(r.rel_error**2 for r in report.layers))
        gaps.append(float((model(IDS) - reference).detach().norm()))
    assert errors[0] > errors[1] > errors[2]
    assert gaps[0] > gaps[2]


def test_ratio_keeps_that_fraction_of_the_selected_layers():
    model = Toy()
    before, selected = count_parameters(model), mlp_params(model)
    report = compress(model, "mlp.*", ratio=0.4, progress=False)
    assert report.budget == before - selected + math.floor(0.4 * selected)
    assert 0.99 * report.budget <= report.params_after <= report.budget
    assert report.params_after - (before - selected) == mlp_params(model)


@pytest.mark.parametrize("extra", [0, 1000])
def test_a_budget_at_the_model_size_changes_nothing_and_says_so(extra):
    for kwargs in (dict(ratio=1.0), dict(budget=count_parameters(Toy()) + extra)):
        model = Toy()
        snap = snapshot(model)
        report = compress(model, "mlp.*", progress=False, **kwargs)
        assert_unchanged(model, snap)
        assert report.layers == [] and report.params_after == report.params_before == count_parameters(model)
        assert "nothing replaced" in " ".join(str(report).split()) and len(report.kept_dense) == 4


def test_explicit_full_rank_is_exact_for_conv1d_and_keeps_modes():
    model = tiny_gpt2()
    model.transformer.h[1].mlp.c_proj.weight.requires_grad_(False)
    ids = IDS % 64
    reference = model(ids).logits
    rules = {"mlp.c_fc": {"shape_a": (128, 1), "rank": 32}, "mlp.c_proj": {"shape_a": (32, 1), "rank": 32}}
    report = compress(model, rules, progress=False)
    torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-4)
    for r in report.layers:
        layer = model.get_submodule(r.name)
        assert isinstance(layer, KronLinear) and layer.orientation == "conv1d" and not layer.training
        assert r.rel_error < 1e-5 and r.shape == ((128, 32) if "c_fc" in r.name else (32, 128))
    frozen = model.transformer.h[1].mlp.c_proj
    assert not frozen.a.requires_grad and frozen.bias.requires_grad
    assert model.transformer.h[0].mlp.c_proj.a.requires_grad
    assert is_conv1d(model.transformer.h[0].attn.c_attn)  # not selected, untouched


def test_gpt2_budget_solver_and_pinned_shapes():
    model = tiny_gpt2()
    before = count_parameters(model)
    budget = int(0.85 * before)
    report = compress(model, "mlp.*", budget=budget, shape_a=[(16, 8), (8, 16)], max_rank=6, progress=False)
    assert report.params_after == count_parameters(model) <= budget  # coarse options (rank ≤ 6): no 1% promise
    for r in report.layers:
        assert r.shape_a in ((16, 8), (8, 16)) and r.rank <= 6
    assert model.lm_head.weight is model.transformer.wte.weight  # the tied head is untouched
    assert isinstance(model.lm_head, nn.Linear)


def test_dtype_and_device_follow_each_module():
    model = Toy().double()
    model.blocks[1].float()
    compress(model, "mlp.*", ratio=0.5, progress=False)
    for i, dtype in ((0, torch.float64), (1, torch.float32)):
        for name in ("fc1", "fc2"):
            layer = model.blocks[i]["mlp"].get_submodule(name)
            if isinstance(layer, KronLinear):
                assert layer.a.dtype == layer.b.dtype == layer.bias.dtype == dtype
                assert layer.a.device == model.embed.weight.device


def test_prune_init_plans_with_its_own_error_curves():
    model = Toy()
    weights = {r: linear_weight(model.get_submodule(r)).detach().clone() for r in ("blocks.0.mlp.fc1", "out")}
    report = compress(model, ["blocks.0.mlp.fc1", "out"], ratio=0.5, init="prune", progress=False)
    for r in report.layers:
        assert r.init == "prune"
        assert r.rel_error == pytest.approx(float(error_curve(weights[r.name], r.shape_a, "prune")[r.rank]), abs=1e-6)


def test_error_weights_steer_the_solver():
    base = Toy()
    plain = compress(copy.deepcopy(base), "mlp.*", ratio=0.3, progress=False)
    favoured = "blocks.1.mlp.fc2"
    weighted = compress(copy.deepcopy(base), "mlp.*", ratio=0.3, error_weights={favoured: 50.0}, progress=False)

    def err(report, name):
        return {r.name: r.rel_error for r in report.layers}.get(name, 0.0)

    assert err(weighted, favoured) < err(plain, favoured)

    # a curve function replaces the Frobenius curves: a layer said to be free to compress gets the fewest params
    def curves(name, weight, shape_a):
        exact = error_curve(weight, shape_a)
        return torch.zeros_like(exact) if name == favoured else exact

    hooked = compress(copy.deepcopy(base), "mlp.*", ratio=0.3, error_weights=curves, progress=False)
    row = {r.name: r for r in hooked.layers}[favoured]
    assert row.rank == 1 and row.params_after == min(r.params_after for r in hooked.layers)


def test_a_module_under_two_names_is_replaced_once_everywhere():
    model = Toy()
    model.blocks[1]["mlp"] = model.blocks[0]["mlp"]
    before = count_parameters(model)
    report = compress(model, "blocks.1.mlp.fc1", ratio=0.5, progress=False)
    assert model.blocks[0]["mlp"].fc1 is model.blocks[1]["mlp"].fc1
    assert isinstance(model.blocks[0]["mlp"].fc1, KronLinear)
    (row,) = report.layers
    assert row.name == "blocks.0.mlp.fc1" and row.aliases == ("blocks.1.mlp.fc1",)
    assert report.params_after == count_parameters(model) == before - row.params_before + row.params_after


def test_bert_mlp_rules_leave_attention_output_alone():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=32, max_position_embeddings=16)
    model = transformers.BertModel(config).eval()
    compress(model, ["intermediate.dense", "output.dense", "!attention.output.dense"], ratio=0.5, progress=False)
    kron = {n for n, m in model.named_modules() if isinstance(m, KronLinear)}
    assert kron and kron <= {f"encoder.layer.{i}.{p}.dense" for i in range(2) for p in ("intermediate", "output")}
    assert all(type(model.encoder.layer[i].attention.output.dense) is nn.Linear for i in range(2))


def test_report_table_and_json():
    model = Toy()
    report = compress(model, "mlp.*", ratio=0.5, progress=False)
    assert isinstance(report, CompressionReport)
    text = str(report)
    for r in report.layers:
        assert r.name in text
    assert f"{report.params_after:,}" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["params_after"] == count_parameters(model)
    assert [row["name"] for row in data["layers"]] == [r.name for r in report.layers]
    assert data["layers"][0]["shape_a"] == list(report.layers[0].shape_a)


BAD = [
    (dict(rules="decoder.*", ratio=0.5), r"'decoder\.\*' matches no nn.Linear"),
    (dict(rules="blocks.0.mlp.act", ratio=0.5), "matches no layer kronfact can replace.*ReLU"),
    (dict(budget=10), r"unreachable: .* smallest reachable total is [\d,]+ and the largest [\d,]+"),
    (dict(budget=0), "budget= must be a positive number"),
    (dict(budget=-5.0), "budget= must be a positive number"),
    (dict(budget=math.nan), "budget= must be a positive number"),
    (dict(budget=5000, ratio=0.5), "not both"),
    (dict(ratio=0.0), r"ratio= must be in \(0, 1\]"),
    (dict(ratio=1.5), r"ratio= must be in \(0, 1\]"),
    (dict(), "needs one shape_a and a rank; missing for blocks.0.mlp.fc1"),
    (dict(shape_a=(4, 4)), "missing for"),
    (dict(shape_a=(3, 4), rank=1), r"blocks\.0\.mlp\.fc1 \(64×16 .*shape_a=\(3, 4\) does not divide"),
    (dict(shape_a=[(3, 4), (5, 5)], ratio=0.5), "none of the candidate shapes"),
    (dict(rules={"mlp.fc1": {"shape_a": (8, 4), "rank": 2}, "mlp.fc2": {"shape_a": (4, 8), "rank": 99}}),
     r"blocks\.0\.mlp\.fc2: rank=99 is above the maximum"),
    (dict(shape_a=(8, 4), rank=2, init="svd"), "init must be one of"),
    (dict(rules={"mlp.*": {"init": "svd"}}, ratio=0.5), r"blocks\.0\.mlp\.fc1: init must be one of"),
    (dict(ratio=0.5, rank=0), "rank must be a positive int"),
    (dict(ratio=0.5, error_weights={"blocks.9.mlp.fc1": 2.0}), "not selected"),
    (dict(ratio=0.5, error_weights={"blocks.0.mlp.fc1": -1.0}), "must be a finite number"),
    (dict(ratio=0.5, error_weights=lambda n, w, s: torch.ones(2, 2)), "must return a 1-D tensor"),
    (dict(rules={"mlp.fc1": {"shape_a": (8, 4), "prune_index": [(0, 0)]}}, init="vanloan"), "prune_index needs"),
]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_input_is_a_clear_error_and_leaves_the_model_unchanged(kwargs, message):
    model = Toy()
    snap = snapshot(model)
    kwargs = {"rules": "mlp.*", "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        compress(model, **kwargs)
    assert_unchanged(model, snap)


def test_a_bad_weight_found_while_factorizing_leaves_the_model_unchanged():
    model = Toy()
    with torch.no_grad():
        model.blocks[1]["mlp"].fc2.weight[0, 0] = math.nan
    snap = snapshot(model)
    for kwargs in (dict(shape_a=(8, 4), rank=2), dict(ratio=0.5)):
        with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2: .*NaN"):
            compress(model, "mlp.*", progress=False, **kwargs)
        assert_unchanged(model, snap)


def test_models_without_eligible_layers_and_already_compressed_ones():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D submodule"):
        compress(conv, "*", ratio=0.5, progress=False)
    model = Toy()
    compress(model, "mlp.*", shape_a=(8, 4), rank=2, progress=False)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="matches no layer kronfact can replace.*KronLinear"):
        compress(model, "mlp.*", ratio=0.5, progress=False)
    assert_unchanged(model, snap)


# --------------------------------------------------------------------------- calibration and permutation

def _calibration_batches(n=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (4, 8), generator=g) for _ in range(n)]


def _calibrated_errors(model, original, batches):
    """‖(W − Ŵ)·Xᵀ‖_F per replaced layer, X = the layer's inputs in the original model."""
    from kronfact.calibrate import collect_input_moments

    names = [n for n, m in model.named_modules() if isinstance(m, KronLinear)]
    moments = collect_input_moments(original, names, batches)
    out = {}
    for n in names:
        diff = (linear_weight(original.get_submodule(n)) - model.get_submodule(n).to_dense()).detach().double()
        out[n] = float(torch.einsum("oi,ij,oj->", diff, moments[n].double(), diff)) ** 0.5
    return out


def test_calibration_never_fits_worse_on_the_calibration_objective():
    original, batches = Toy(), _calibration_batches()
    plain, calibrated = copy.deepcopy(original), copy.deepcopy(original)
    rules = {"blocks.*.mlp.fc1": {"shape_a": (8, 4), "rank": 2}, "blocks.*.mlp.fc2": {"shape_a": (4, 8), "rank": 2}}
    compress(plain, rules, progress=False)
    report = compress(calibrated, rules, calibration=batches, progress=False)
    assert {r.init for r in report.layers} == {"calibrated"}
    ours, theirs = _calibrated_errors(calibrated, original, batches), _calibrated_errors(plain, original, batches)
    assert all(ours[n] <= theirs[n] * (1 + 1e-6) + 1e-9 for n in ours)
    assert sum(ours.values()) < sum(theirs.values())  # and strictly better overall on these layers


def test_calibration_drives_the_budget_solver_and_fits_the_budget():
    model, batches = Toy(), _calibration_batches()
    budget = count_parameters(model) - mlp_params(model) // 2
    # a calibration generator is consumed once: moments are collected a single time
    report = compress(model, "mlp.*", budget=budget, calibration=(b for b in batches), method="kron",
                      progress=False)
    assert report.params_after <= budget and report.params_after == count_parameters(model)
    assert all(r.init == "calibrated" for r in report.layers)
    assert model(IDS).shape == (3, 5, 4)


def test_permutation_search_moves_toward_a_hidden_kronecker_structure():
    model = Toy()
    g = torch.Generator().manual_seed(3)
    layer = model.blocks[0]["mlp"].fc1  # (64, 16)
    k = torch.kron(torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g))
    rows, cols = torch.randperm(64, generator=g), torch.randperm(16, generator=g)
    with torch.no_grad():
        layer.weight.copy_(k[rows][:, cols])
    plain = copy.deepcopy(model)
    rule = {"blocks.0.mlp.fc1": {"shape_a": (8, 4), "rank": 1}}
    before = compress(plain, rule, progress=False).layers[0].rel_error
    x = torch.randn(7, 16)
    want = layer(x)
    report = compress(model, rule, permute=10, progress=False)
    new = model.blocks[0]["mlp"].fc1
    assert report.layers[0].rel_error < before - 0.05  # the search moves rows/columns toward the structure
    assert new.in_perm is not None or new.out_perm is not None
    torch.testing.assert_close(new(x), x @ new.to_dense().T + new.bias)
    torch.testing.assert_close(new.to_dense(), linear_weight(layer), atol=report.layers[0].rel_error * 20, rtol=0)
    assert float((new(x) - want).detach().norm() / want.detach().norm()) < 3 * report.layers[0].rel_error + 1e-4


@pytest.mark.parametrize("kwargs, message", [
    ({"permute": -1}, "permute must be a non-negative int"),
    ({"permute": 2, "init": "prune"}, "refine Van Loan's fit"),
    ({"calibration": _calibration_batches(1), "init": "random"}, "refine Van Loan's fit"),
    ({"calibration": []}, "calibration= is empty"),
])
def test_bad_calibration_or_permutation_options_leave_the_model_unchanged(kwargs, message):
    model = Toy()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        compress(model, "blocks.*.mlp.fc1", shape_a=(8, 4), rank=1, progress=False, **kwargs)
    assert_unchanged(model, snap)


def test_calibration_keeps_each_module_mode_and_is_not_run_for_an_incomplete_plan():
    model = Toy()
    model.blocks[1].train(False)  # mixed modes
    modes = {n: m.training for n, m in model.named_modules()}
    runs = []

    def batches():
        runs.append(1)
        yield from _calibration_batches(2)

    with pytest.raises(ValueError, match="needs one shape_a and a rank"):
        compress(model, "mlp.*", calibration=batches(), progress=False)  # no budget, no shapes
    assert runs == []  # the model never ran
    compress(model, {"blocks.*.mlp.fc1": {"shape_a": (8, 4), "rank": 1}}, calibration=batches(), progress=False)
    assert runs == [1]
    assert {n: m.training for n, m in model.named_modules() if n in modes} == \
        {n: mode for n, mode in modes.items() if n in dict(model.named_modules())}
