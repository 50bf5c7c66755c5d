"""Perplexity protocols and LAMBADA checked against direct, per-token computations on tiny models."""

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kronfact.data import DatasetUnavailableError, load_dataset_text, load_tokenizer, tokenize_file
from kronfact.evaluate import lambada, perplexity

transformers = pytest.importorskip("transformers")

VOCAB = 48


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    return transformers.GPT2LMHeadModel(config).eval()


def token_nll(model, ids, begin, t):
    """NLL of ids[t] given ids[begin:t], by one forward pass of that prefix alone."""
    with torch.no_grad():
        logits = model(ids[None, begin:t]).logits[0, -1]
    return float(-F.log_softmax(logits.double(), -1)[ids[t]])


def random_ids(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 40), context=st.integers(2, 16), stride_frac=st.floats(0.01, 1.0),
       batch_size=st.integers(1, 5), seed=st.integers(0, 100))
def test_sliding_scores_every_token_once_with_its_window_context(tiny_lm, n, context, stride_frac, batch_size, seed):
    # Reference, token by token: target t is scored in the first window (begin k·stride) that reaches it,
    # with inputs ids[k·stride : t].
    stride = max(1, round(stride_frac * context))
    ids = random_ids(n, seed)
    nlls = []
    for t in range(1, n):
        k = max(0, -(-(t - context) // stride))
        nlls.append(token_nll(tiny_lm, ids, k * stride, t))
    expected = math.exp(sum(nlls) / (n - 1))
    got = perplexity(tiny_lm, ids, context=context, stride=stride, batch_size=batch_size)
    assert got == pytest.approx(expected, rel=1e-4)


def test_one_window_is_exp_mean_nll_for_both_protocols(tiny_lm):
    ids = random_ids(16, 1)  # fits in the model's 16 positions
    with torch.no_grad():
        logits = tiny_lm(ids[None]).logits[0]
    expected = math.exp(float(F.cross_entropy(logits[:-1], ids[1:])))
    assert perplexity(tiny_lm, ids) == pytest.approx(expected, rel=1e-5)  # context from config.n_positions
    assert perplexity(tiny_lm, ids, protocol="krony") == pytest.approx(expected, rel=1e-5)


def test_sliding_with_stride_equal_context_is_non_overlapping_token_weighted(tiny_lm):
    ids, context = random_ids(45, 2), 8
    total, count = 0.0, 0
    for begin in range(0, 44, context):  # inputs ids[b:b+c] predict ids[b+1:b+c+1]
        x, y = ids[begin:begin + context], ids[begin + 1:begin + context + 1]
        with torch.no_grad():
            logits = tiny_lm(x[None]).logits[0, :len(y)]
        total += float(F.cross_entropy(logits, y, reduction="sum"))
        count += len(y)
    assert count == 44
    got = perplexity(tiny_lm, ids, context=context, stride=context, batch_size=3)
    assert got == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.mark.parametrize("n", [40, 41, 42])  # last window full, one token (unscorable), two tokens
def test_krony_is_mean_of_window_means(tiny_lm, n):
    ids, context = random_ids(n, 3), 10
    means = []
    for chunk in torch.split(ids, context):
        if len(chunk) < 2:
            continue
        with torch.no_grad():
            logits = tiny_lm(chunk[None]).logits[0]
        means.append(float(F.cross_entropy(logits[:-1], chunk[1:])))
    got = perplexity(tiny_lm, ids, context=context, protocol="krony", batch_size=2)
    assert got == pytest.approx(math.exp(sum(means) / len(means)), rel=1e-5)


def test_eval_mode_inside_training_flag_restored_after(tiny_lm):
    ids = random_ids(30, 4)
    reference = perplexity(tiny_lm, ids, context=8)
    tiny_lm.train()
    try:
        assert perplexity(tiny_lm, ids, context=8) == pytest.approx(reference, rel=1e-6)  # dropout 0.3 was off
        assert tiny_lm.training
    finally:
        tiny_lm.eval()
    assert perplexity(tiny_lm, ids, context=8, batch_size=1) == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(ids=torch.zeros(2, 5, dtype=torch.long)), "1-D integer"),
    (dict(ids=torch.zeros(5)), "1-D integer"),
    (dict(ids=torch.zeros(1, dtype=torch.long)), "at least 2 tokens"),
    (dict(ids=torch.tensor([1, VOCAB + 3])), "different tokenizer"),
    (dict(stride=9, context=8), "stride must be"),
    (dict(stride=0), "stride must be"),
    (dict(context=1), "context must be"),
    (dict(protocol="chunked"), "protocol must be"),
    (dict(protocol="krony", stride=4, context=8), "non-overlapping"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments_raise_clear_value_errors(tiny_lm, kwargs, message):
    kwargs = {"ids": random_ids(20, 5), **kwargs}
    with pytest.raises(ValueError, match=message):
        perplexity(tiny_lm, **kwargs)


def test_context_needed_when_the_model_does_not_tell():
    with pytest.raises(ValueError, match="pass context"):
        perplexity(nn.Embedding(10, 10), torch.arange(5))


# ------------------------------------------------------------------------------------------------ LAMBADA


class CharTokenizer:
    """One token per character (its code point): words are several tokens."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


class Bigram(nn.Module):
    """logits = table[previous token]; argmax follows ``successor``."""

    def __init__(self, successor):
        super().__init__()
        self.table = nn.Parameter(torch.randn(128, 128, generator=torch.Generator().manual_seed(0)))
        with torch.no_grad():
            for a, b in successor.items():
                self.table[ord(a), ord(b)] += 20

    def forward(self, ids):
        return self.table[ids]


def test_lambada_accuracy_needs_every_word_token_and_ppl_matches_direct_computation():
    model = Bigram({"b": " ", " ": "c", "c": "d"})
    texts = ["xab cd", "the b cd", "ab ce", "zzb cdd"]  # hit, hit, miss on the last token, miss on the extra d
    res = lambada(model, CharTokenizer(), texts, context=64, batch_size=3)
    assert res.count == 4
    assert res.accuracy == pytest.approx(0.5)
    word_nll = []
    for text in texts:
        head, word = text.rsplit(" ", 1)
        ids = torch.tensor([ord(c) for c in text])
        logp = F.log_softmax(model.table.detach()[ids[:-1]].double(), -1)
        n = len(word) + 1  # " word"
        word_nll.append(-float(sum(logp[t - 1, ids[t]] for t in range(len(ids) - n, len(ids)))))
    assert res.perplexity == pytest.approx(math.exp(sum(word_nll) / len(texts)), rel=1e-6)


def test_lambada_truncates_long_contexts_from_the_left():
    model = Bigram({"b": " ", " ": "c", "c": "d"})
    res = lambada(model, CharTokenizer(), ["q" * 100 + "b cd"], context=8)
    assert res.accuracy == 1.0


def test_lambada_rejects_a_text_without_a_last_word():
    with pytest.raises(ValueError, match="example 1"):
        lambada(Bigram({}), CharTokenizer(), ["a b", "single"], context=8)
    with pytest.raises(ValueError, match="non-empty list"):
        lambada(Bigram({}), CharTokenizer(), "a b", context=8)


# ------------------------------------------------------------------------------------- files and datasets


def word_tokenizer_dir(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(["[UNK]", "to", "be", "or", "not"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_tokenize_file_with_a_folders_tokenizer(tmp_path):
    tok = load_tokenizer(word_tokenizer_dir(tmp_path))
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be\nhamlet")
    assert tokenize_file(text, tok).tolist() == [1, 2, 3, 4, 1, 2, 0]


def test_tokenize_file_bad_inputs(tmp_path):
    tok = load_tokenizer(word_tokenizer_dir(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        tokenize_file(tmp_path / "missing.txt", tok)
    (tmp_path / "latin1.txt").write_bytes(b"to be \xe9\xff")
    with pytest.raises(ValueError, match="not UTF-8"):
        tokenize_file(tmp_path / "latin1.txt", tok)
    (tmp_path / "short.txt").write_text("be")
    with pytest.raises(ValueError, match="at least 2"):
        tokenize_file(tmp_path / "short.txt", tok)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer"):
        load_tokenizer(tmp_path / "bad")
    with pytest.raises(ValueError, match="not a model folder"):
        load_tokenizer(tmp_path / "nowhere")


def fake_datasets(load):
    module = types.ModuleType("datasets")
    module.load_dataset = load
    return module


def test_load_dataset_text_without_datasets_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → ImportError
    with pytest.raises(DatasetUnavailableError, match="needs the `datasets` package.*--text FILE"):
        load_dataset_text("wikitext-2")


def test_load_dataset_text_offline_names_the_cause(monkeypatch):
    def load(path, config, split, streaming=False):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(load))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetUnavailableError, match="HF_HUB_OFFLINE is set.*ConnectionError.*--text FILE"):
        load_dataset_text("wikitext-103")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(DatasetUnavailableError, match="unreachable"):
        load_dataset_text("lambada")


def test_load_dataset_text_uses_non_raw_test_splits(monkeypatch):
    calls = []

    def load(path, config, split, streaming=False):
        calls.append((path, config, split))
        if path == "EleutherAI/lambada_openai":
            raise FileNotFoundError("not cached")
        return {"text": [" = Title = \n", " a line \n"]}

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(load))
    assert load_dataset_text("wikitext-103") == " = Title = \n\n\n a line \n"
    assert load_dataset_text("wikitext-2") == " = Title = \n\n\n a line \n"
    assert load_dataset_text("lambada") == [" = Title = \n", " a line \n"]  # fell back to "lambada"
    assert calls == [("wikitext", "wikitext-103-v1", "test"), ("wikitext", "wikitext-2-v1", "test"),
                     ("EleutherAI/lambada_openai", "default", "test"), ("lambada", None, "test")]
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset_text("ptb")


def test_tiny_gpt2_shakespeare_perplexity_is_plausible(tiny_gpt2_dir, shakespeare_dir):
    model = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    ids = tokenize_file(shakespeare_dir / "val.txt", load_tokenizer(tiny_gpt2_dir))[:20_000]
    ppl = perplexity(model, ids, stride=256, batch_size=16)  # context 256 from the config
    assert 35 < ppl < 90  # the model card's validation perplexity is ≈ 56 at context 256


def test_training_data_streams_from_the_hub_with_a_fallback(monkeypatch):
    from kronfact.data import load_tokens

    calls = []

    def load(path, config, split, streaming=False):
        calls.append((path, split, streaming))
        if path == "Skylion007/openwebtext":
            raise ConnectionError("unreachable")
        return iter([{"text": "to be or not"}, {"text": "to be"}] * 100)

    class Tok:  # a word-level stand-in with an end-of-text token
        eos_token_id = 0

        def encode(self, text, add_special_tokens=True):
            return [len(w) for w in text.split()]

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(load))
    ids = load_tokens("openwebtext", Tok(), max_tokens=12)
    assert ids.tolist() == [2, 2, 2, 3, 0, 2, 2, 0, 2, 2, 2, 3]  # documents joined by end-of-text
    assert calls == [("Skylion007/openwebtext", "train", True), ("openwebtext", "train", True)]
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DatasetUnavailableError, match="openwebtext .train. needs the `datasets` package"):
        load_tokens("openwebtext", Tok())
