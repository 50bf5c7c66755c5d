"""Safetensors checkpoints read without trusting them: headers, shards, folders; never a pickle.

:func:`open_checkpoint` takes a ``.safetensors`` file, a ``*.safetensors.index.json`` or a folder
holding either, and returns every tensor's name, dtype, shape and place after checking each header
against its file: the length, well-formed entries, known dtypes, byte spans that match dtype × shape,
lie inside the file, overlap nothing and cover the data exactly (the safetensors format allows no
holes and no trailing bytes). Nothing is read beyond the headers; a pickle is refused by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import KronfactError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# safetensors dtype → bytes per element; the floating ones hold weights
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
# Model types whose checkpoints store transformers' Conv1D weights (in, out).
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, from its (validated) header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int


@dataclass
class Checkpoint:
    """The tensors of a .safetensors file, a sharded checkpoint or a model folder, and its config.json."""

    tensors: dict[str, TensorInfo]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def conv1d(self) -> bool:
        """True when the config says GPT-2-style Conv1D: those weights are stored (in, out)."""
        archs = self.config.get("architectures") or []
        return (self.config.get("model_type") in CONV1D_MODEL_TYPES
                or any(str(a).startswith(("GPT2", "OpenAIGPT", "ImageGPT")) for a in archs))


def refuse_pickle(path: Path) -> KronfactError:
    return KronfactError(f"{path} is a pickle checkpoint; kronfact never unpickles files (loading one can run "
                         "arbitrary code). Convert it to safetensors with a tool you trust, e.g. transformers' "
                         "model.save_pretrained(DIR, safe_serialization=True), then pass the .safetensors file or "
                         "folder")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without trusting it.

    Checks the header length against the file size, that the header is a JSON object of well-formed
    entries of known dtypes, that every tensor's byte span matches its dtype and shape, lies inside the
    file and overlaps no other, and that the spans cover the data exactly — before any tensor is read.
    """
    size = path.stat().st_size
    if size < 8:
        raise KronfactError(f"{path} is not a safetensors file: {size} bytes, too short for a header")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise KronfactError(f"{path} is truncated or not a safetensors file: its first 8 bytes give a "
                                f"{n}-byte header, but the file has {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KronfactError(f"{path} is corrupt: its header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise KronfactError(f"{path} is corrupt: its header is not a JSON object")
    data_size = size - 8 - n
    tensors, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list)
                  and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise KronfactError(f"{path} is corrupt: malformed header entry for {name!r}: {str(entry)[:120]}")
        if dtype not in DTYPE_BYTES:
            raise KronfactError(f"{path} is corrupt or uses a dtype kronfact does not read: {name} has dtype "
                                f"{dtype!r}; known: {', '.join(DTYPE_BYTES)}")
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise KronfactError(f"{path}: the header lies: {name} is {dtype} {tuple(shape)} "
                                f"({math.prod(shape) * DTYPE_BYTES[dtype]} bytes) but its offsets span "
                                f"{end - begin} bytes")
        if end > data_size:
            raise KronfactError(f"{path} is truncated or its header lies: {name} ends at byte {8 + n + end}, past the "
                                f"end of the file ({size} bytes); re-download or re-save it")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, begin)
        spans.append((begin, end, name))
    reach, last = 0, ""  # the furthest end so far, and whose
    for begin, end, name in sorted(spans):
        if begin < reach and begin < end:
            raise KronfactError(f"{path}: the header lies: tensors {last} and {name} overlap in the file")
        if begin > reach:
            raise KronfactError(f"{path} is corrupt: bytes {reach}–{begin} of its data belong to no tensor "
                                f"(before {name}); a header entry was removed or the file was edited — re-save it")
        if end > reach:
            reach, last = end, name
    if reach != data_size:
        raise KronfactError(f"{path} is corrupt: {data_size - reach} bytes after the last tensor belong to none; "
                            "the file was appended to or a header entry was removed — re-save it")
    return tensors


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KronfactError(f"{path} is not valid JSON ({err})") from None
    return config if isinstance(config, dict) else {}


def _read_index(path: Path) -> dict[str, TensorInfo]:
    """The tensors of a sharded checkpoint, each shard's header validated, the index checked against them."""
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
        raise KronfactError(f"{path} is not a valid safetensors index (a JSON object with a 'weight_map' of "
                            "tensor name → shard file)") from None
    headers = {}
    for shard in sorted(set(weight_map.values())):
        file = path.parent / shard
        if not file.is_file():
            raise KronfactError(f"{path} lists shard {shard}, which does not exist in {path.parent}")
        headers[shard] = read_header(file)
    tensors = {}
    for name, shard in weight_map.items():
        if name not in headers[shard]:
            raise KronfactError(f"{path} says {name} is in {shard}, but that shard has no such tensor")
        tensors[name] = headers[shard][name]
    return tensors


def open_checkpoint(path: Path) -> Checkpoint:
    """A .safetensors file, a ``*.safetensors.index.json`` or a folder holding either (config.json beside)."""
    if not path.exists():
        raise KronfactError(f"{path} does not exist")
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        files = sorted(path.glob("*.safetensors"))
        if len(indexes) > 1:
            raise KronfactError(f"{path} holds several indexes ({', '.join(p.name for p in indexes)}); "
                                "pass one of them")
        if indexes:
            return Checkpoint(_read_index(indexes[0]), _read_config(path))
        if files:
            tensors: dict[str, TensorInfo] = {}
            for file in files:
                for name, info in read_header(file).items():
                    if name in tensors:
                        raise KronfactError(f"{name} is in both {tensors[name].file.name} and {file.name} in {path}")
                    tensors[name] = info
            return Checkpoint(tensors, _read_config(path))
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise refuse_pickle(pickles[0])
        raise KronfactError(f"{path} holds no .safetensors checkpoint")
    if path.name.endswith(".safetensors.index.json"):
        return Checkpoint(_read_index(path), _read_config(path.parent))
    if path.suffix == ".safetensors":
        return Checkpoint(read_header(path), _read_config(path.parent))
    if path.suffix in PICKLE_SUFFIXES:
        raise refuse_pickle(path)
    raise KronfactError(f"{path} is not a checkpoint kronfact reads: give a .safetensors file, a "
                        "*.safetensors.index.json or a model folder")
