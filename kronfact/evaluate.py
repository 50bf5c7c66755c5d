"""Evaluate causal language models: perplexity in two protocols, LAMBADA last-word accuracy.

- ``protocol="sliding"`` — the standard token-weighted sliding window (Hugging Face perplexity guide).
  Windows of ``context`` input tokens start every ``stride`` tokens; each window scores only the
  targets no earlier window scored, so every token after the first is scored exactly once, with
  between ``context - stride + 1`` and ``context`` tokens of left context (the first window's targets
  with 1 … context). Perplexity = exp(Σ NLL / (N − 1)). ``stride == context`` is the plain
  non-overlapping, token-weighted evaluation.
- ``protocol="krony"`` — Krony-PT's ``perplexity.py``: non-overlapping windows of ``context`` tokens
  (the last one shorter), each window's first token unscored, perplexity = exp(mean over windows of
  the window's mean NLL). The short last window weighs as much as a full one.

Texts come from :mod:`kronfact.data` (local files, or named sets through ``datasets``; Krony-PT used
the non-raw wikitext test splits). For encoders, :func:`embedding_cosine` compares sentence
embeddings (mean-pooled last hidden states) with the uncompressed model's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import encode
from .errors import KronfactError
from .progress import progress_bar

Protocol = Literal["sliding", "krony"]
PROTOCOLS: tuple[str, ...] = ("sliding", "krony")

def model_context(model: nn.Module) -> int:
    """The model's maximum number of positions, read from its config."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise KronfactError("cannot tell the model's context length (its config has no n_positions or "
                        "max_position_embeddings): pass context=N")


def _check_context(model: nn.Module, context: int | None) -> int:
    """``context`` (default: the model's positions) checked against the model's positions."""
    if context is None:
        return model_context(model)
    if not isinstance(context, int) or isinstance(context, bool) or context < 2:
        raise KronfactError(f"context must be an int ≥ 2, got {context!r}")
    try:
        limit = model_context(model)
    except ValueError:
        return context  # the config does not say: trust the caller
    if context > limit:
        raise KronfactError(f"context={context} exceeds the model's {limit} positions; use context ≤ {limit}")
    return context


def lm_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """(batch, seq) token ids → (batch, seq, vocab) logits, for HF models and plain modules alike."""
    out = model(input_ids)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """eval() and no_grad inside; the model's training flag restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_ids(ids: Tensor, model: nn.Module) -> Tensor:
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
        what = f"a {ids.dim()}-D {ids.dtype} tensor" if isinstance(ids, Tensor) else type(ids).__name__
        raise KronfactError(f"ids must be a 1-D integer tensor of token ids, got {what}")
    if ids.numel() < 2:
        raise KronfactError(f"need at least 2 tokens to measure perplexity, got {ids.numel()}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (isinstance(vocab, int) and high >= vocab):
        raise KronfactError(f"token ids span [{low}, {high}] but the model's vocabulary has {vocab} entries: "
                            "the text was tokenized with a different tokenizer than the model's")
    return ids.long()


def _exp(nll: float) -> float:
    """exp(mean NLL) as a perplexity; inf (not OverflowError) for a diverged model's NLL above ~709."""
    return math.exp(nll) if nll < 709.0 else math.inf


@dataclass(frozen=True)
class _Window:
    """Inputs ids[begin:end]; the logits at positions [first, end − begin) are scored (each predicts the next id)."""

    begin: int
    end: int
    first: int


def _windows(n: int, context: int, stride: int, protocol: str) -> list[_Window]:
    if protocol == "krony":
        return [_Window(b, min(b + context, n), 0) for b in range(0, n, context) if min(b + context, n) - b >= 2]
    windows, prev_end, begin = [], 0, 0
    while prev_end < n - 1:  # inputs ids[begin:end] predict targets ids[begin+1:end+1]
        end = min(begin + context, n - 1)
        windows.append(_Window(begin, end, max(prev_end, begin) - begin))
        prev_end, begin = end, begin + stride
    return windows


def _batches(windows: list[_Window], batch_size: int) -> Iterator[list[_Window]]:
    """Consecutive windows of equal length, at most ``batch_size`` at a time."""
    batch: list[_Window] = []
    for w in windows:
        if batch and (len(batch) == batch_size or w.end - w.begin != batch[0].end - batch[0].begin):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def perplexity(
    model: nn.Module,
    ids: Tensor,
    context: int | None = None,
    stride: int | None = None,
    protocol: Protocol = "sliding",
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """Perplexity of a causal LM on one long token sequence ``ids`` (N,).

    ``context`` defaults to the model's maximum positions; ``stride`` (sliding only) defaults to
    ``context // 2``, so every token past the first window sees at least half a context of left
    context. ``batch_size`` windows go through the model at once: the logits take
    batch_size × context × vocab floats. Runs on the model's device in eval mode under no_grad and
    restores the training flag.
    """
    if protocol not in PROTOCOLS:
        raise KronfactError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    ids = _check_ids(ids, model)
    context = _check_context(model, context)
    if protocol == "krony" and stride not in (None, context):
        raise KronfactError(f"the krony protocol uses non-overlapping windows (stride = context = {context}); "
                            f"got stride={stride}: drop it or use protocol='sliding'")
    stride = max(context // 2, 1) if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= context:
        raise KronfactError(f"stride must be an int in [1, context={context}], got {stride!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise KronfactError(f"batch_size must be a positive int, got {batch_size!r}")

    windows = _windows(ids.numel(), context, stride, protocol)
    device = _model_device(model)
    nll_sum, count, window_means = 0.0, 0, []
    with _eval_mode(model), progress_bar(progress, len(windows), f"perplexity ({protocol})") as advance:
        for batch in _batches(windows, batch_size):
            inputs = torch.stack([ids[w.begin:w.end] for w in batch]).to(device)
            if protocol == "krony":  # the window's own tokens are its targets; its last logit goes unused
                targets = inputs[:, 1:]
            else:
                targets = torch.stack([ids[w.begin + 1:w.end + 1] for w in batch]).to(device)
            logits = lm_logits(model, inputs)
            for j, w in enumerate(batch):
                n_scored = targets.shape[1] - w.first
                nll = F.cross_entropy(logits[j, w.first:w.first + n_scored].float(), targets[j, w.first:],
                                      reduction="sum")
                nll_sum, count = nll_sum + float(nll), count + n_scored
                window_means.append(float(nll) / n_scored)
            advance(len(batch))
    mean_nll = sum(window_means) / len(window_means) if protocol == "krony" else nll_sum / count
    return _exp(mean_nll)


@dataclass(frozen=True)
class LambadaResult:
    """Last-word accuracy (every token of the word predicted greedily) and the word's perplexity."""

    accuracy: float
    perplexity: float  # exp(mean over examples of the word's summed NLL), lm-evaluation-harness style
    count: int


def lambada(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    context: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> LambadaResult:
    """LAMBADA: predict each text's last word (split at the last space) from the text before it.

    The target is the full token sequence of " word"; a hit needs the greedy prediction of every
    one of its tokens. Inputs longer than ``context`` keep their last ``context`` tokens. Examples
    are batched right-padded (causal attention keeps padding out of every scored position).
    """
    if isinstance(texts, str) or not len(texts):
        raise KronfactError("texts must be a non-empty list of strings (one LAMBADA example each)")
    context = _check_context(model, context)
    examples = []  # (ids, number of target tokens)
    for i, text in enumerate(texts):
        head, sep, word = text.strip().rpartition(" ")
        if not sep or not head or not word:
            raise KronfactError(f"LAMBADA example {i} has no 'context last-word' split: {text[:60]!r}")
        ctx_ids, word_ids = encode(tokenizer, head), encode(tokenizer, " " + word)
        if not ctx_ids or not word_ids or len(word_ids) >= context:
            raise KronfactError(f"LAMBADA example {i} tokenizes to nothing usable: {text[:60]!r}")
        examples.append(((ctx_ids + word_ids)[-context:], len(word_ids)))
    _check_ids(torch.tensor([t for ids, _ in examples for t in ids]), model)

    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    device = _model_device(model)
    hits, nll_total = 0, 0.0
    with _eval_mode(model), progress_bar(progress, len(order), "lambada") as advance:
        for start in range(0, len(order), batch_size):
            chunk = [examples[i] for i in order[start:start + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            inputs = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, (ids, _) in enumerate(chunk):
                inputs[j, :len(ids)] = torch.tensor(ids)
            logits = lm_logits(model, inputs.to(device)).float()
            for j, (ids, n_word) in enumerate(chunk):
                pred = logits[j, len(ids) - n_word - 1:len(ids) - 1]
                target = inputs[j, len(ids) - n_word:len(ids)].to(device)
                nll_total += float(F.cross_entropy(pred, target, reduction="sum"))
                hits += bool((pred.argmax(-1) == target).all())
            advance(len(chunk))
    return LambadaResult(accuracy=hits / len(examples), perplexity=_exp(nll_total / len(examples)),
                         count=len(examples))


# ------------------------------------------------------------------------------------------- encoders


def mean_pool(hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """(batch, seq, dim) → (batch, dim): the mean over the positions where ``mask`` (batch, seq) is 1."""
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def hidden_states(model: nn.Module, ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Last hidden states (batch, seq, dim) of a transformers model (base model or one with a head)."""
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    if getattr(out, "hidden_states", None) is not None:
        return out.hidden_states[-1]
    raise KronfactError(f"{type(model).__name__} returns no hidden states; the hidden objective needs a "
                        "transformers model")


@torch.no_grad()
def embedding_cosine(model: nn.Module, reference: nn.Module, tokenizer: Any, texts: list[str],
                     batch_size: int = 32, max_length: int = 128) -> float:
    """Mean cosine similarity of ``model``'s and ``reference``'s sentence embeddings (mean-pooled last
    hidden states, padding masked out) over ``texts``, each tokenized with its special tokens."""
    if not texts:
        raise KronfactError("embedding_cosine needs at least one text, got an empty list")
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
            rows = [[i for i, m in zip(e.ids, e.attention_mask, strict=True) if m][:max_length]
                    for e in tokenizer.encode_batch(chunk)]
        else:
            rows = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in chunk]
        ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, row in enumerate(rows):
            ids[j, :len(row)], mask[j, :len(row)] = torch.tensor(row), 1
        ids, mask = ids.to(device), mask.to(device)
        a = mean_pool(hidden_states(model, ids, mask).float(), mask)
        b = mean_pool(hidden_states(reference, ids, mask).float(), mask)
        total += float(F.cosine_similarity(a, b, dim=-1).sum())
    return total / len(texts)
