"""Structured neuron pruning (kronfact.prune, kronfact.blocks) and compress(method="neurons").

Math: the OBS path's predicted cost equals the least-squares refit error it leads to; the refit solves
the normal equations; kept sets have the requested size. Surgery: groups are found on GPT-2 (Conv1D),
Llama (gated), BERT and OPT; the model fits its budget, runs, round-trips through save/load bit-exactly;
sequential OBS + refit beats one-shot activation pruning on a real trained model; bad calibration
leaves the model unchanged.
"""

import copy
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

transformers = pytest.importorskip("transformers")

import kronfact  # noqa: E402
from kronfact.blocks import BlockRunner, block_stack, calibration_mode  # noqa: E402
from kronfact.modules import count_parameters, linear_weight  # noqa: E402
from kronfact.prune import (  # noqa: E402
    PrunedLinear,
    neuron_groups,
    obs_path,
    refit,
)
from kronfact.rules import select  # noqa: E402

T = transformers
VOCAB = 64
SMALL = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 32}
BERT_MLP = ["intermediate.dense", r"re:layer\.\d+\.output\.dense$"]


def llama() -> nn.Module:
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(**SMALL, intermediate_size=64, vocab_size=VOCAB, num_key_value_heads=2,
                                            max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                                            pad_token_id=2)).eval()


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32,
                                          bos_token_id=0, eos_token_id=0)).eval()


def bert() -> nn.Module:
    torch.manual_seed(0)
    return T.BertForMaskedLM(T.BertConfig(**SMALL, intermediate_size=64, vocab_size=VOCAB,
                                          max_position_embeddings=32)).eval()


def opt() -> nn.Module:
    torch.manual_seed(0)
    return T.OPTForCausalLM(T.OPTConfig(**SMALL, ffn_dim=64, vocab_size=VOCAB, word_embed_proj_dim=32,
                                        max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=2)).eval()


ARCHS = {"llama": (llama, "mlp.*", 3), "gpt2": (gpt2, "mlp.*", 2), "bert": (bert, BERT_MLP, 2),
         "opt": (opt, ["fc1", "fc2"], 2)}


def batches(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (2, 16), generator=g) for _ in range(n)]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------------------------- math


@settings(max_examples=30, deadline=None)
@given(n=st.integers(4, 24), out=st.integers(1, 6), frac=st.floats(0.1, 0.9), chunk=st.integers(1, 5),
       seed=st.integers(0, 10_000))
def test_obs_path_cost_is_the_refit_error_it_leads_to(n, out, frac, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    gram = h.T @ h
    keep = max(1, int(frac * n))
    kept, path = obs_path(gram, w, keep, damping=0.0, chunk=chunk)
    assert kept.numel() == keep and torch.equal(kept, kept.sort().values) and kept.unique().numel() == keep
    assert path[0] == (n, 0.0) and path[-1][0] == keep
    assert all(b[1] >= a[1] - 1e-9 for a, b in zip(path, path[1:], strict=False))  # removing never lowers the error
    new = refit(gram, gram @ w.T, kept, damping=0.0)
    err = float(((h @ w.T - h[:, kept] @ new.T) ** 2).sum())
    assert abs(err - path[-1][1]) <= 1e-6 * (1 + err)
    # the refit solves the normal equations: the residual is orthogonal to the kept inputs
    resid = h @ w.T - h[:, kept] @ new.T
    assert float((h[:, kept].T @ resid).abs().max()) <= 1e-7 * (1 + float((h @ w.T).abs().max()) * 4 * n)


def test_obs_keeps_the_fixed_columns_and_checks_keep():
    gram = torch.eye(5, dtype=torch.float64)
    w = torch.tensor([[9.0, 0.1, 0.2, 8.0, 0.0]], dtype=torch.float64)
    kept, _ = obs_path(gram, w, 1, fixed=1)
    assert kept.tolist() == [0]  # the zero-weight last column is fixed, not counted
    with pytest.raises(ValueError, match="keep must be in"):
        obs_path(gram, w, 5, fixed=1)


# --------------------------------------------------------------------------------------- grouping


@pytest.mark.parametrize("arch", ARCHS)
def test_groups_pair_producers_with_their_consumer(arch):
    build, rules, per_group = ARCHS[arch]
    model = build()
    groups, rest = neuron_groups(select(model, rules))
    assert len(groups) == 2 and not rest
    for g in groups:
        assert len(g.names) == per_group
        d_out, hidden = linear_weight(g.consumer.module).shape
        assert hidden == g.hidden > d_out == 32  # GPT-2's default inner size is 4·d, the others' 64
        assert all(tuple(linear_weight(t.module).shape) == (hidden, 32) for t in g.producers)
        assert g.params == sum(p.numel() for n in g.names for p in model.get_submodule(n).parameters())
        assert g.params_at(g.hidden) == g.params


def test_attention_projections_form_no_group():
    model = llama()
    groups, rest = neuron_groups(select(model, ["self_attn.*", "mlp.*"]))
    assert len(groups) == 2 and {t.name.rsplit(".", 1)[1] for t in rest} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_block_runner_reproduces_the_model_block_by_block():
    model = llama()
    ids = batches(2)
    names = [t.name for t in select(model, "mlp.*")]
    assert block_stack(model, names)[0] == "model.layers"
    with calibration_mode(model):
        runner = BlockRunner(model, names, ids)
        for i in range(len(runner.blocks)):
            runner.advance(i)
        hidden = [args[0] for args, _ in runner.calls]
        final = runner.run(len(runner.blocks) - 1)
        want = [model.model(x).last_hidden_state for x in ids]
    assert len(hidden) == 2
    for out, ref in zip(final, want, strict=True):  # the last block's output, before the final norm
        torch.testing.assert_close(model.model.norm(out), ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- surgery


@pytest.mark.parametrize("arch", ARCHS)
def test_compress_prunes_to_the_budget_and_round_trips(arch):
    build, rules, _ = ARCHS[arch]
    model = build()
    ids = batches(1, seed=5)[0]
    report = kronfact.compress(model, rules, ratio=0.5, calibration=batches(), progress=False)
    assert report.params_after == count_parameters(model) <= report.budget
    assert report.params_after >= report.budget - 2 * 8 * (3 * 32 + 2)  # within one rounding step per group
    assert {r.init for r in report.layers} == {"neurons"}
    assert all(isinstance(model.get_submodule(r.name), PrunedLinear) for r in report.layers)
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    with tempfile.TemporaryDirectory() as d:
        kronfact.save_pretrained(model, Path(d) / "m")
        again = kronfact.from_pretrained(Path(d) / "m")
        assert torch.equal(logits(again, ids), out)
        file = Path(d) / "w.safetensors"
        kronfact.save(model, file)
        assert torch.equal(logits(kronfact.load(file, build()), ids), out)
    kronfact.merge(model)  # pruned layers are already dense: merge keeps them
    assert torch.equal(logits(model, ids), out)


def test_full_budget_is_a_no_op_and_more_budget_is_closer():
    original = llama()
    ids = batches(1, seed=5)[0]
    want = logits(original, ids)
    same = copy.deepcopy(original)
    report = kronfact.compress(same, "mlp.*", ratio=1.0, calibration=batches(), progress=False)
    assert report.layers == [] and report.params_after == report.params_before
    assert torch.equal(logits(same, ids), want)
    errors = []
    for ratio in (0.75, 0.25):
        model = copy.deepcopy(original)
        kronfact.compress(model, "mlp.*", ratio=ratio, calibration=batches(8), progress=False)
        errors.append(float((logits(model, ids) - want).norm()))
    assert errors[0] < errors[1]


def test_without_calibration_a_budget_warns_that_data_is_needed():
    with pytest.warns(UserWarning, match="calibration="):
        kronfact.compress(llama(), "mlp.*", ratio=0.5, progress=False)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("calibration, message", [
    ([torch.full((2, 16), VOCAB + 5)], "outside the model's vocabulary"),
    ([torch.randn(2, 16)], "integer token ids"),
    ([torch.randint(3, VOCAB, (16,))], r"shape \(batch, seq\)"),
    ([{"attention_mask": torch.ones(2, 16)}], "give token-id tensors"),
    ([], "is empty"),
    ([torch.randint(3, VOCAB, (1, 8))], "fewer than the 32 neurons kept"),
])
def test_bad_calibration_leaves_the_model_unchanged(calibration, message):
    model = llama()
    snap = _state(model)
    with pytest.raises(ValueError, match=message):
        kronfact.compress(model, "mlp.*", ratio=0.5, calibration=calibration, method="neurons", progress=False)
    assert _state(model).keys() == snap.keys() and all(torch.equal(v, snap[k]) for k, v in _state(model).items())
    assert not any(isinstance(m, PrunedLinear) for m in model.modules())


def test_non_finite_activations_are_a_clear_error_and_nothing_changes():
    model = llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    snap = _state(model)
    with pytest.raises(ValueError, match="non-finite activations"):
        kronfact.compress(model, "mlp.*", ratio=0.5, calibration=batches(), progress=False)
    assert not any(isinstance(m, PrunedLinear) for m in model.modules())
    assert all(torch.equal(v, snap[k]) or torch.isnan(v).any() for k, v in _state(model).items())


def test_neurons_method_refuses_layers_outside_mlp_groups_and_pinned_options():
    model = llama()
    with pytest.raises(ValueError, match="belong to no MLP group"):
        kronfact.compress(model, ["mlp.*", "q_proj"], ratio=0.5, calibration=batches(), method="neurons")
    with pytest.raises(ValueError, match="needs calibration"):
        kronfact.compress(model, "mlp.*", ratio=0.5, method="neurons")
    with pytest.raises(ValueError, match="method must be one of"):
        kronfact.compress(model, "mlp.*", ratio=0.5, method="svd")
    assert not any(isinstance(m, PrunedLinear) for m in model.modules())


# --------------------------------------------------------------------------------- real models


def _tiny_gpt2_setup(tiny_gpt2_dir, shakespeare_dir):
    from kronfact.data import load_tokenizer, sample_windows, tokenize_file

    tok = load_tokenizer(tiny_gpt2_dir)
    train = tokenize_file(shakespeare_dir / "train.txt", tok)
    val = tokenize_file(shakespeare_dir / "val.txt", tok)[:8193]
    cal = list(sample_windows(train, 16, 256, seed=0).split(8))
    return val, cal


@pytest.mark.slow
def test_sequential_obs_refit_beats_one_shot_activation_pruning_on_a_trained_model(tiny_gpt2_dir, shakespeare_dir):
    from kronfact.evaluate import perplexity

    val, cal = _tiny_gpt2_setup(tiny_gpt2_dir, shakespeare_dir)
    base = T.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    ours = copy.deepcopy(base)
    report = kronfact.compress(ours, "mlp.*", ratio=0.5, calibration=cal, progress=False)
    # the naive baseline at the same sizes: largest mean|h|·‖down column‖, no refit, original activations
    naive = copy.deepcopy(base)
    groups, _ = neuron_groups(select(naive, "mlp.*"))
    absmean = {}
    hooks = [g.consumer.module.register_forward_pre_hook(
        lambda _m, a, n=g.consumer.name: absmean.__setitem__(n, absmean.get(n, 0) + a[0].abs().sum((0, 1))))
        for g in groups]
    with torch.no_grad():
        for b in cal:
            naive(b)
    for h in hooks:
        h.remove()
    for g in groups:
        k = next(r.shape_a[0] for r in report.layers if r.name == g.producers[0].name)
        w = linear_weight(g.consumer.module)
        idx = torch.topk(absmean[g.consumer.name] * w.norm(dim=0), k).indices
        with torch.no_grad():
            for t in g.producers:
                linear_weight(t.module)[:] *= torch.isin(torch.arange(g.hidden), idx)[:, None]
                t.module.bias[:] *= torch.isin(torch.arange(g.hidden), idx)
    p_ours, p_naive, p_base = (perplexity(m, val, context=256) for m in (ours, naive, base))
    assert p_base < p_ours < p_naive


SMOLLM2 = os.environ.get("KRONFACT_SMOLLM2")


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2, reason="set KRONFACT_SMOLLM2 to a SmolLM2-135M folder (../shared/tools/smollm2.py)")
def test_smollm2_half_mlp_stays_usable(shakespeare_dir):
    from kronfact.data import load_tokenizer, sample_windows, tokenize_file
    from kronfact.evaluate import perplexity

    tok = load_tokenizer(SMOLLM2)
    val = tokenize_file(shakespeare_dir / "val.txt", tok)[:8193]
    cal = list(sample_windows(tokenize_file(shakespeare_dir / "train.txt", tok), 32, 256, seed=0).split(8))
    model = T.AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    before = perplexity(model, val, context=512, stride=512)
    kronfact.compress(model, "mlp.*", ratio=0.5, calibration=cal, progress=False)
    assert perplexity(model, val, context=512, stride=512) < 2 * before
