"""Token streams and named datasets: everything kronfact reads text from.

Local text always works: :func:`tokenize_file` (one UTF-8 file), :func:`load_tokens` (a file, a
folder of ``*.txt``, or a named set). Named sets (:data:`DATASETS`) load through ``datasets`` when
the hub is reachable, else :class:`DatasetUnavailableError` says so and points at local files:
evaluation uses their test split (:data:`EVAL_SETS`, :func:`load_dataset_text`), training their
train split (:data:`TRAIN_SETS`). :func:`sample_windows` and :func:`calibration_batches` draw seeded
random windows of a stream.

>>> [tuple(b.shape) for b in calibration_batches(torch.arange(1000), windows=10, length=64)]
[(8, 64), (2, 64)]
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import KronfactError

# name → (datasets.load_dataset path, config) candidates, tried in order
DATASETS: dict[str, list[tuple[str, str | None]]] = {
    "openwebtext": [("Skylion007/openwebtext", None), ("openwebtext", None)],
    "wikitext-103": [("wikitext", "wikitext-103-v1")],
    "wikitext-2": [("wikitext", "wikitext-2-v1")],
    "lambada": [("EleutherAI/lambada_openai", "default"), ("lambada", None)],
}
EVAL_SETS = ("wikitext-103", "wikitext-2", "lambada")  # their test split: kronfact eval --dataset, recipes' [eval]
TRAIN_SETS = ("openwebtext", "wikitext-103", "wikitext-2")  # their train split: load_tokens, recipes' [train]


class DatasetUnavailableError(RuntimeError):
    """A named evaluation set could not be loaded (``datasets`` missing, hub unreachable, offline)."""


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, for a ``tokenizers.Tokenizer`` or a transformers tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast HF tokenizers: no length warnings
    if backend is not None or hasattr(tokenizer, "encode_batch"):
        return list((backend or tokenizer).encode(text, add_special_tokens=False).ids)
    return list(tokenizer.encode(text, add_special_tokens=False))


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """The tokenizer saved in a model folder: its tokenizer.json (``tokenizers``), else AutoTokenizer."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KronfactError(f"{folder} is not a model folder; cannot find its tokenizer")
    if (folder / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise KronfactError("reading tokenizer.json needs the `tokenizers` package: "
                                "pip install 'kronfact[hf]'") from None
        try:
            return Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as err:
            raise KronfactError(f"{folder / 'tokenizer.json'} is not a valid tokenizer file: {err}") from None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise KronfactError(f"{folder} has no tokenizer.json, and loading its tokenizer otherwise needs "
                            "transformers: pip install 'kronfact[hf]'") from None
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        raise KronfactError(f"no usable tokenizer in {folder} ({type(err).__name__}: {err}); "
                            "save one there (tokenizer.json) or point at a folder that has one") from None


def tokenize_file(path: str | os.PathLike, tokenizer: Any) -> Tensor:
    """A UTF-8 text file → 1-D LongTensor of token ids (no special tokens added)."""
    path = Path(path)
    if not path.is_file():
        raise KronfactError(f"text file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise KronfactError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    ids = encode(tokenizer, text)
    if len(ids) < 2:
        raise KronfactError(f"{path} holds {len(ids)} token(s); need at least 2 to measure perplexity")
    return torch.tensor(ids, dtype=torch.long)


def hub_texts(candidates: Sequence[tuple[str, str | None]], split: str, *, streaming: bool, what: str) -> Any:
    """The "text" column of the first of ``candidates`` ((path, config) pairs) that ``datasets`` loads:
    a list, or a lazy iterator when ``streaming``. Raises :class:`DatasetUnavailableError` naming each
    failure and the way out (local text files); ``what`` names the set in the message."""
    try:
        import datasets
    except ImportError:
        raise DatasetUnavailableError(f"{what} needs the `datasets` package (pip install 'kronfact[data]') and "
                                      "the network; or use a local text file instead (--text FILE, or a path as "
                                      "training data)") from None
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "0") not in ("", "0")]
    errors = []
    for path, config in candidates:
        try:
            rows = datasets.load_dataset(path, config, split=split, streaming=streaming)
            return (row["text"] for row in rows) if streaming else list(rows["text"])
        except Exception as err:  # datasets raises many types: connection, offline, missing config
            errors.append(f"{path}{'/' + config if config else ''}: {type(err).__name__}: {str(err)[:200]}")
    why = (f"{' and '.join(offline)} is set and it is not cached" if offline
           else "the Hugging Face hub is unreachable or the set is not cached")
    raise DatasetUnavailableError(f"cannot load {what} through datasets ({why}; {'; '.join(errors)}); "
                                  "use a local text file instead (--text FILE, or a path as training data)")


def load_dataset_text(name: str) -> str | list[str]:
    """A named evaluation set's test split through ``datasets``.

    "wikitext-103" / "wikitext-2": the non-raw test split (as Krony-PT), lines joined with "\\n\\n"
    as in the Hugging Face perplexity guide → one string. "lambada": the OpenAI LAMBADA test set
    (EleutherAI/lambada_openai, else "lambada") → a list of texts for :func:`lambada`.
    Raises :class:`DatasetUnavailableError` naming the cause when it cannot be loaded.
    """
    if name not in EVAL_SETS:
        raise KronfactError(f"unknown dataset {name!r}; choose one of {', '.join(EVAL_SETS)}")
    texts = hub_texts(DATASETS[name], "test", streaming=False, what=name)
    return texts if name == "lambada" else "\n\n".join(texts)


def load_tokens(source: str | os.PathLike, tokenizer: Any, *, split: str = "train",
                max_tokens: int | None = None) -> Tensor:
    """A 1-D LongTensor token stream from a UTF-8 text file, a folder of ``*.txt`` files (sorted,
    concatenated), or a dataset name in :data:`TRAIN_SETS` (``split`` of it, streamed through
    ``datasets``; documents joined by the tokenizer's end-of-text token when it has one).
    At most ``max_tokens`` tokens (needed for the huge openwebtext)."""
    name = str(source)
    if name in TRAIN_SETS:
        eos = _eos_id(tokenizer)
        ids: list[int] = []
        for text in hub_texts(DATASETS[name], split, streaming=True, what=f"{name} ({split})"):
            ids += encode(tokenizer, text) + ([] if eos is None else [eos])
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        stream = torch.tensor(ids, dtype=torch.long)
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise KronfactError(f"{path} holds no *.txt files to train on")
            stream = torch.cat([tokenize_file(f, tokenizer) for f in files])
        elif path.is_file():
            stream = tokenize_file(path, tokenizer)
        else:
            raise KronfactError(f"training data {name!r} is neither a text file, a folder of *.txt files, nor one of "
                                f"the datasets {sorted(TRAIN_SETS)}")
    return stream if max_tokens is None else stream[:max_tokens]


def _eos_id(tokenizer: Any) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None and hasattr(tokenizer, "token_to_id"):
        eos = tokenizer.token_to_id("<|endoftext|>")
    return eos


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (hashed: nearby inputs give unrelated streams)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_windows(ids: Tensor, batch_size: int, length: int, seed: int) -> Tensor:
    """(batch_size, length) random contiguous windows of the 1-D stream ``ids``, drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length + 1, (batch_size,), generator=g)
    return ids[starts[:, None] + torch.arange(length)]


def calibration_batches(ids: Tensor, windows: int = 32, length: int = 256, *, seed: int = 0,
                        batch_size: int = 8) -> list[Tensor]:
    """``windows`` random windows of ``length`` tokens of the stream ``ids`` (seed), in batches of
    ``batch_size``: the ``calibration=`` argument of :func:`kronfact.compress`. A stream shorter than
    one window gives windows of its whole length.

    """
    if windows < 1 or length < 2:
        raise KronfactError(f"calibration needs windows ≥ 1 and length ≥ 2, got windows={windows}, length={length}")
    length = min(length, ids.numel() - 1)
    if length < 2:
        raise KronfactError(f"calibration text holds too few tokens ({ids.numel()}); give at least a few hundred")
    return list(sample_windows(ids, windows, length, seed).split(batch_size))
