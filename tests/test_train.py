"""Recovery training: objectives checked against direct computations, weight decay on the factors only,
kill-and-resume reproduces the loss curve bit for bit, best-on-validation selection, encoder distillation."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from kronfact.data import DatasetUnavailableError, load_tokens  # noqa: E402
from kronfact.evaluate import perplexity  # noqa: E402
from kronfact.io import load as kronfact_load  # noqa: E402
from kronfact.kron import decompose  # noqa: E402
from kronfact.layer import KronLinear  # noqa: E402
from kronfact.modules import linear_weight  # noqa: E402
from kronfact.objectives import distillation_loss, hidden_distillation_loss  # noqa: E402
from kronfact.pretrained import from_pretrained  # noqa: E402
from kronfact.train import TrainConfig, lr_at, param_groups, train  # noqa: E402

VOCAB = 64
SEQ = 16


def kronify(model: torch.nn.Module, suffixes: tuple[str, ...], rank: int = 2) -> torch.nn.Module:
    """Replace the named MLP layers by Van Loan KronLinear (A with half of each side), in place."""
    for name, module in list(model.named_modules()):
        if name.endswith(suffixes):
            w = linear_weight(module)
            factors = decompose(w, (w.shape[0] // 4, w.shape[1] // 8), rank=rank)
            orientation = "linear" if isinstance(module, torch.nn.Linear) else "conv1d"
            model.set_submodule(name, KronLinear.from_factors(factors, module.bias.detach(), orientation=orientation))
    return model


def tiny_gpt2(seed: int = 0, dropout: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                     bos_token_id=0, eos_token_id=0)
    return kronify(transformers.GPT2LMHeadModel(config), ("mlp.c_fc", "mlp.c_proj"))


def stream(step: int, n: int = 4000) -> torch.Tensor:
    """A learnable token stream: each token is the previous one plus ``step`` (mod VOCAB)."""
    return (torch.arange(n) * step) % VOCAB


def config(**kw) -> TrainConfig:
    base = dict(tokens=4 * 2 * SEQ * 6, batch_size=4, grad_accum=2, seq_len=SEQ, lr=3e-3, progress=False)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------- losses


@settings(max_examples=25, deadline=None)
@given(alpha=st.floats(0, 1), temperature=st.floats(0.5, 5), positions=st.integers(1, 6), vocab=st.integers(2, 9),
       seed=st.integers(0, 10_000))
def test_distillation_loss_matches_direct_formula(alpha, temperature, positions, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, positions, vocab, generator=g, dtype=torch.float64) * 3
    t = torch.randn(2, positions, vocab, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, vocab, (2, positions), generator=g)
    ce, kl, n = 0.0, 0.0, 0
    for b in range(2):
        for i in range(positions):
            log_p = s[b, i] - torch.logsumexp(s[b, i], 0)
            ce -= float(log_p[y[b, i]])
            ps = torch.softmax(s[b, i] / temperature, 0)
            pt = torch.softmax(t[b, i] / temperature, 0)
            kl += float((pt * (pt.log() - ps.log())).sum())
            n += 1
    expected = (1 - alpha) * ce / n + alpha * temperature**2 * kl / n
    got = float(distillation_loss(s, t, y, alpha, temperature))
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert float(distillation_loss(s, None, y, alpha, temperature)) == pytest.approx(ce / n, rel=1e-4, abs=1e-5)


def test_hidden_loss_is_zero_on_the_teacher_and_combines_mse_and_cosine():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 5, 8, generator=g)
    s = t + 0.3 * torch.randn(3, 5, 8, generator=g)
    assert float(hidden_distillation_loss(t, t)) == pytest.approx(0, abs=1e-6)
    mse = float(((s - t) ** 2).mean())
    cos = float(F.cosine_similarity(s.mean(1), t.mean(1), dim=-1).mean())
    assert float(hidden_distillation_loss(s, t, mse=2.0, cosine=0.5)) == pytest.approx(2 * mse + 0.5 * (1 - cos),
                                                                                       rel=1e-5)


@settings(max_examples=30, deadline=None)
@given(total=st.integers(1, 200), warmup=st.floats(0, 0.5), ratio=st.floats(0, 1))
def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor(total, warmup, ratio):
    c = TrainConfig(lr=1.0, warmup=warmup, min_lr_ratio=ratio)
    lrs = [lr_at(s, total, c) for s in range(total)]
    w = min(round(warmup * total), total)
    assert lrs[:w] == pytest.approx([(s + 1) / w for s in range(w)])
    decay = lrs[w:]
    assert all(a >= b - 1e-12 for a, b in zip(decay, decay[1:], strict=False))
    assert all(ratio - 1e-12 <= v <= 1 + 1e-12 for v in decay)
    if decay:
        assert decay[0] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------- optimizer


def test_weight_decay_applies_to_the_kronecker_factors_only():
    model = tiny_gpt2()
    groups = param_groups(model, 0.5)
    factors = {id(m.a) for m in model.modules() if isinstance(m, KronLinear)}
    factors |= {id(m.b) for m in model.modules() if isinstance(m, KronLinear)}
    decayed = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    assert {id(p) for p in decayed} == factors and len(decayed) == len(factors) == 8
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # each (tied) param once
    # behaviour: with zero gradients AdamW only shrinks the decayed tensors, by (1 − lr·wd)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(groups, lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.1 * 0.5) if id(p) in factors else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0, msg=name)


# ------------------------------------------------------------------------------------------ training


def test_loss_decreases_over_a_few_steps():
    result = train(tiny_gpt2(dropout=0.0), stream(7), config(tokens=4 * 2 * SEQ * 20))
    losses = [loss for _, loss in result.curve()]
    assert len(losses) == 20 and result.tokens == 20 * 4 * 2 * SEQ
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2


def test_distillation_needs_a_teacher_and_trains_with_one():
    with pytest.raises(ValueError, match="teacher"):
        train(tiny_gpt2(), stream(7), config(distill=True))
    teacher = tiny_gpt2(seed=1, dropout=0.0)
    teacher.transformer.wpe.requires_grad_(False)  # the caller's own flags, restored after training
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainable = []
    result = train(tiny_gpt2(), stream(7), config(distill=True, alpha=1.0, lr=1e-2, tokens=4 * 2 * SEQ * 10),
                   teacher=teacher, callback=lambda _: trainable.append(any(p.requires_grad
                                                                            for p in teacher.parameters())))
    losses = [loss for _, loss in result.curve()]
    assert losses[-1] < losses[0]  # pure KL to the teacher goes down
    assert trainable and not any(trainable)  # frozen while it teaches
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # it taught, it did not learn
    assert {n for n, p in teacher.named_parameters() if not p.requires_grad} == {"transformer.wpe.weight"}


def test_kill_and_resume_gives_the_identical_loss_curve(tmp_path):
    cfg = dict(eval_every=2, save_every=1, tokens=4 * 2 * SEQ * 6)  # 6 steps, dropout on
    val = stream(5, 300)
    full = train(tiny_gpt2(), stream(7), config(out_dir=str(tmp_path / "a"), **cfg), val_data=val)

    class Killed(Exception):
        pass

    def kill_at_3(entry):
        if entry["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        train(tiny_gpt2(), stream(7), config(out_dir=str(tmp_path / "b"), **cfg), val_data=val, callback=kill_at_3)
    resumed_model = tiny_gpt2()
    resumed = train(resumed_model, stream(7), config(out_dir=str(tmp_path / "b"), **cfg), val_data=val)
    assert resumed.resumed_from == 3
    assert resumed.curve() == full.curve() and len(full.curve()) == 6  # bit-exact on CPU
    assert resumed.curve("val") == full.curve("val")
    # a different run cannot resume silently from this checkpoint
    with pytest.raises(ValueError, match="batch_size"):
        train(tiny_gpt2(), stream(7), config(out_dir=str(tmp_path / "b"), batch_size=2, **cfg), val_data=val)


def test_best_on_validation_weights_are_kept(tmp_path):
    # Train on "+7" sequences, validate on "+5" ones: validation gets worse as training specialises,
    # so the best checkpoint is an early one and must be what the model holds at the end.
    val = stream(5, 400)
    for out_dir in (None, str(tmp_path / "run")):
        model = tiny_gpt2(dropout=0.0)
        result = train(model, stream(7), config(eval_every=1, lr=1e-2, out_dir=out_dir), val_data=val)
        vals = result.curve("val")
        assert len(vals) == result.steps + 1  # step 0 (before training) included
        best_step, best_val = min(vals, key=lambda sv: sv[1])
        assert (result.best_step, result.best_val) == (best_step, best_val)
        assert result.best_step < result.steps and result.final_val > result.best_val
        now = math.log(perplexity(model, val, context=SEQ, stride=SEQ))
        assert now == pytest.approx(best_val, rel=1e-6)
    saved = from_pretrained(tmp_path / "run" / "best")  # a loadable transformers folder
    assert math.log(perplexity(saved, val, context=SEQ, stride=SEQ)) == pytest.approx(best_val, rel=1e-6)


def test_every_file_train_writes_reopens_with_kronfact(tmp_path):
    """last/model.safetensors and best/ reopen with kronfact.load / from_pretrained, for a plain module
    and a transformers model: one file name, one format."""
    def plain_skeleton():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(VOCAB, 16), torch.nn.Linear(16, VOCAB))

    plain = plain_skeleton()
    plain[1] = KronLinear.from_factors(decompose(plain[1].weight.detach(), (8, 4), rank=2), plain[1].bias.detach())
    hf = tiny_gpt2(dropout=0.0)
    val = stream(5, 400)
    for model, cfg, out in ((plain, {"objective": "lm"}, tmp_path / "plain"), (hf, {}, tmp_path / "hf")):
        train(model, stream(7), config(out_dir=str(out), eval_every=2, lr=1e-2, **cfg), val_data=val)
        skeleton = plain_skeleton() if model is plain else transformers.GPT2LMHeadModel(hf.config)
        last = kronfact_load(out / "last" / "model.safetensors", skeleton)
        assert sum(isinstance(m, KronLinear) for m in last.modules()) == sum(
            isinstance(m, KronLinear) for m in model.modules()) > 0
        best = (kronfact_load(out / "best" / "model.safetensors", plain_skeleton()) if model is plain
                else from_pretrained(out / "best"))
        # the model ends holding its best weights on validation: the best file holds exactly those
        assert best.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(t, model.state_dict()[k]) for k, t in best.state_dict().items())


def test_training_that_only_hurts_keeps_the_untrained_weights():
    """Step 0 is a candidate: recovery training is never worse on validation than no training."""
    val = stream(5, 400)
    model = tiny_gpt2(dropout=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, stream(7), config(eval_every=2, lr=30.0, grad_clip=0.0), val_data=val)
    assert result.best_step == 0 and result.best_val == result.initial_val
    assert not result.final_val <= result.initial_val  # worse, or NaN
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_encoder_hidden_distillation_improves_embedding_cosine():
    torch.manual_seed(0)
    config_ = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
    teacher = transformers.BertModel(config_).eval()
    with torch.no_grad():  # a random init's MLPs barely move the residual stream; make them matter as trained ones do
        for name, p in teacher.named_parameters():
            if name.endswith(("intermediate.dense.weight", "output.dense.weight")) and "attention" not in name:
                p.mul_(8)
    student = kronify(copy.deepcopy(teacher), ("intermediate.dense", "output.dense"), rank=1)
    data = torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(1))
    result = train(student, data, config(tokens=4 * 2 * SEQ * 25, lr=1e-2, hidden_mse=1.0, hidden_cosine=1.0),
                   teacher=teacher, val_data=data[-800:])
    (_, before), *_, (_, after) = result.curve("val_cosine")
    assert after > before + 0.01
    assert result.curve("val")[-1][1] < result.curve("val")[0][1]


# ----------------------------------------------------------------------------------------------- data


class CharTokenizer:
    """One id per character (enough for load_tokens: it only needs ``encode``)."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % VOCAB for c in text]


def test_load_tokens_from_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("world")
    (tmp_path / "a.txt").write_text("hello ")
    assert load_tokens(tmp_path / "a.txt", CharTokenizer()).tolist() == [ord(c) % VOCAB for c in "hello "]
    assert load_tokens(tmp_path, CharTokenizer(), max_tokens=8).tolist() == [ord(c) % VOCAB for c in "hello wo"]
    with pytest.raises(ValueError, match="neither a text file"):
        load_tokens(tmp_path / "missing.txt", CharTokenizer())


def test_unreachable_dataset_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DatasetUnavailableError, match="openwebtext"):
        load_tokens("openwebtext", CharTokenizer(), max_tokens=10)


def test_bad_inputs_are_value_errors():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="1-D integer"):
        train(tiny_gpt2(), torch.rand(100), config())
    with pytest.raises(ValueError, match="fewer than one window"):
        train(tiny_gpt2(), stream(7, 10), config())


# ------------------------------------------------------------------------------- config and input checks


def test_seq_len_beyond_the_model_context_is_a_clear_error():
    model = tiny_gpt2()  # n_positions = 32
    with pytest.raises(ValueError, match=r"seq_len=33 .*context of 32 positions.*at most 32"):
        train(model, stream(7), config(seq_len=33))
    assert train(tiny_gpt2(), stream(7), config(seq_len=32, tokens=4 * 2 * 32)).steps == 1  # the limit itself works


class PlainLM(torch.nn.Module):
    """A causal-LM-shaped module without a config: its context is unknown and unlimited."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 16)
        self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, input_ids):
        return self.head(self.emb(input_ids))


def test_seq_len_check_is_skipped_when_the_context_is_unknown():
    result = train(PlainLM(), stream(7), config(objective="lm", seq_len=100, tokens=4 * 2 * 100))
    assert result.steps == 1 and math.isfinite(result.history[-1]["loss"])


@pytest.mark.parametrize("field", ["tokens", "batch_size", "grad_accum", "seq_len", "eval_every", "save_every",
                                   "eval_tokens", "seed"])
def test_integer_fields_reject_fractions_and_accept_whole_floats(field):
    with pytest.raises(ValueError, match=f"{field} must be a whole number"):
        TrainConfig(**{field: 64 + 0.5})
    with pytest.raises(ValueError, match=f"{field} must be an integer"):
        TrainConfig(**{field: "64"})
    c = TrainConfig(**{field: 64.0})
    assert getattr(c, field) == 64 and type(getattr(c, field)) is int


def test_whole_float_tokens_train_and_fractional_tokens_fail_up_front():
    with pytest.raises(ValueError, match="tokens must be a whole number"):
        config(tokens=1e6 + 0.5)
    result = train(tiny_gpt2(), stream(7), config(tokens=float(4 * 2 * SEQ * 2)))
    assert result.steps == 2 and isinstance(result.tokens, int)


@pytest.mark.parametrize("field", ["lr", "warmup", "eps", "grad_clip", "alpha"])
def test_float_fields_must_be_numbers(field):
    with pytest.raises(ValueError, match=f"{field} must be a number"):
        TrainConfig(**{field: "0.1"})
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: -1.0})


@pytest.mark.parametrize("warmup, steps", [(0, 0), (0.25, 5), (0.999, 20), (1, 1), (1.0, 1), (5, 5), (5.0, 5),
                                           (1e3, 20)])
def test_warmup_below_one_is_a_fraction_and_from_one_a_whole_number_of_steps(warmup, steps):
    c = TrainConfig(lr=1.0, warmup=warmup, min_lr_ratio=0.0)
    if warmup >= 1:
        assert type(c.warmup) is int
    lrs = [lr_at(s, 20, c) for s in range(20)]
    assert lrs[:steps] == pytest.approx([(s + 1) / steps for s in range(steps)])  # linear ramp to lr
    if steps < 20:
        assert lrs[steps] == pytest.approx(1.0)  # the cosine starts at the peak right after warmup


def test_fractional_warmup_steps_are_rejected():
    with pytest.raises(ValueError, match=r"warmup=2.5 is ambiguous"):
        TrainConfig(warmup=2.5)


def test_embedding_cosine_needs_texts():
    from kronfact.evaluate import embedding_cosine

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="at least one text"):
        embedding_cosine(model, model, CharTokenizer(), [])


# ------------------------------------------------------------------------- accumulation, clipping, progress


def test_gradient_accumulation_matches_one_big_batch_over_the_same_windows():
    """One step of batch 4 × accumulation 2 equals one step of batch 8 on the 8 windows its two
    micro-batches drew (computed here by hand): same loss, same gradient norm, same parameters.

    The trainer draws each micro-batch's windows with its own seed, so a batch-8 run draws other
    windows; the reference step therefore takes the two micro-batches' windows explicitly. float64
    weights (the loss itself is taken in float32, as the trainer does) keep summation-order rounding
    far below the tolerance."""
    from kronfact.data import derived_seed, sample_windows

    data = torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(3))
    cfg = config(tokens=4 * 2 * SEQ, warmup=0, grad_clip=0.0, seed=11)  # one optimizer step
    model = tiny_gpt2(dropout=0.0).double()
    reference = copy.deepcopy(model)
    result = train(model, data, cfg)
    assert result.steps == 1

    windows = torch.cat([sample_windows(data, 4, SEQ + 1, derived_seed(11, 0, 0, micro)) for micro in range(2)])
    assert windows.shape == (8, SEQ + 1)
    reference.train()
    optimizer = torch.optim.AdamW(param_groups(reference, cfg.weight_decay), lr=lr_at(0, 1, cfg), betas=cfg.betas,
                                  eps=cfg.eps)
    logits = reference(input_ids=windows[:, :-1]).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten())
    loss.backward()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()
                                                      if p.grad is not None]))
    optimizer.step()

    entry = result.history[-1]
    assert entry["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    assert entry["grad_norm"] == pytest.approx(float(grad_norm), rel=1e-5)  # scale-sensitive, unlike Adam's step
    trained = dict(model.named_parameters())
    moved = 0
    for name, p in reference.named_parameters():
        torch.testing.assert_close(trained[name], p, rtol=0, atol=1e-7, msg=name)
        moved += not torch.equal(p, dict(tiny_gpt2(dropout=0.0).double().named_parameters())[name])
    assert moved > 0


def _param_change(before: dict[str, torch.Tensor], model: torch.nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack([(p.detach() - before[n]).norm()
                                                       for n, p in model.named_parameters()])))


def test_gradient_clipping_bounds_the_update():
    """With weight decay 0, AdamW's first step moves each entry by lr·g/(|g| + eps). With eps = 1 ≫ the
    clipped gradient, the whole update's norm lies in [lr·c/(c + eps), lr·c/eps] for a clipped norm c,
    so it measures c: a clip of 1e-3 must leave it at ≈ lr·1e-3; without clipping it is much larger."""
    lr, eps, clip = 1e-2, 1.0, 1e-3
    cfg = dict(tokens=4 * 2 * SEQ, warmup=0, weight_decay=0.0, eps=eps, lr=lr)
    changes = {}
    for grad_clip in (clip, 0.0):
        model = tiny_gpt2(dropout=0.0).double()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        result = train(model, stream(7), config(grad_clip=grad_clip, **cfg))
        changes[grad_clip] = _param_change(before, model)
        norm = result.history[-1]["grad_norm"]  # recorded before clipping
        assert norm > 100 * clip
    assert lr * clip / (clip + eps) * (1 - 1e-9) <= changes[clip] <= lr * clip / eps * (1 + 1e-9)
    assert changes[0.0] > 50 * changes[clip]


def test_progress_bar_runs(monkeypatch):
    import importlib

    progress_module = importlib.import_module("kronfact.progress")
    bars = []
    original = progress_module.training_bar

    def recording(enabled, total, start):
        bar = original(enabled, total, start)
        bars.append(bar)
        return bar

    monkeypatch.setattr(progress_module, "training_bar", recording)
    result = train(tiny_gpt2(), stream(7), config(progress=True, tokens=4 * 2 * SEQ * 3))
    assert result.steps == 3 and len(bars) == 1 and bars[0] is not None  # a real rich bar, not the stand-in
    task = bars[0].tasks[0]
    assert task.completed == task.total == 3 and "loss" in task.fields["info"] and "tok/s" in task.fields["info"]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 400), windows=st.integers(1, 20), length=st.integers(2, 64), seed=st.integers(0, 99))
def test_calibration_batches_are_seeded_windows_of_the_stream(n, windows, length, seed):
    from kronfact.data import calibration_batches

    ids = torch.arange(n) * 7  # distinct values: a window's position is readable from its first token
    batches = calibration_batches(ids, windows, length, seed=seed, batch_size=8)
    flat = torch.cat(batches)
    used = min(length, n - 1)
    assert flat.shape == (windows, used) and all(len(b) <= 8 for b in batches)
    starts = flat[:, 0] // 7
    assert torch.equal(flat, ids[starts[:, None] + torch.arange(used)])  # contiguous slices of the stream
    assert torch.equal(flat, torch.cat(calibration_batches(ids, windows, length, seed=seed)))


@pytest.mark.parametrize("ids, windows, length, message", [
    (torch.arange(100), 0, 16, "windows ≥ 1"), (torch.arange(100), 4, 1, "length ≥ 2"),
    (torch.arange(2), 4, 16, "too few tokens")])
def test_calibration_batches_reject_bad_settings(ids, windows, length, message):
    from kronfact.data import calibration_batches

    with pytest.raises(ValueError, match=message):
        calibration_batches(ids, windows, length)
