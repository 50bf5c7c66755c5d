"""Transformers folders: config.json + model.safetensors + kronfact.json, written and read back.

:func:`save_pretrained` writes a folder transformers can read config and tokenizer from (a merged
model gives a plain transformers checkpoint); :func:`from_pretrained` rebuilds the compressed model
from it, or loads a plain folder through transformers itself — refusing, in both cases, any tensor the
model holds that the file does not supply. :func:`verify_folder` checks kronfact.json against the
weights' header without reading a tensor (``kronfact info``).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import staged_dir
from .checkpoint import FLOAT_DTYPES, open_checkpoint
from .errors import KronfactError
from .io import (
    FORMAT_VERSION,
    KRONFACT_JSON,
    WEIGHTS_NAME,
    CompressedModule,
    compressed_modules,
    empty_layer,
    listed,
    load,
    parse_modules,
    read_file_header,
    save,
)
from .version import __version__


def save_pretrained(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, *,
                    overwrite: bool = False) -> None:
    """Write a transformers folder at ``path``: config.json, generation_config.json (if any),
    model.safetensors (:func:`save`), tokenizer files (if ``tokenizer``), and kronfact.json listing the
    compressed modules (absent when there are none: a merged model gives a plain transformers checkpoint).

    Written to a temp folder next to ``path`` and renamed last. A non-empty ``path`` is replaced only
    with ``overwrite=True``.
    """
    if not callable(getattr(getattr(model, "config", None), "save_pretrained", None)):
        raise KronfactError(f"save_pretrained needs a transformers model (with a .config); got "
                            f"{type(model).__name__} — use kronfact.save(model, file) for other torch modules")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KronfactError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise KronfactError(f"{path} already exists and is not empty; pass overwrite=True to replace it")
    with staged_dir(path) as tmp:
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.dtype = model.dtype
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save(model, tmp / WEIGHTS_NAME)
        if entries := compressed_modules(model):
            info = {"kronfact_format": FORMAT_VERSION, "kronfact_version": __version__,
                    "modules": [e.to_dict() for e in entries]}
            (tmp / KRONFACT_JSON).write_text(json.dumps(info, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters registered inside live on the meta device (no memory, no initialisation); buffers stay
    real, since models compute some in ``__init__`` without saving them (rotary frequencies, causal masks).

    >>> with parameters_on_meta():
    ...     layer = nn.Linear(4, 3)
    >>> layer.weight.is_meta, layer.weight.shape
    (True, torch.Size([3, 4]))
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def model_class(folder: Path) -> tuple[Any, type]:
    """(config, transformers class) named by ``folder``/config.json's ``architectures``; nothing downloaded."""
    import transformers

    if not (folder / "config.json").is_file():
        raise KronfactError(f"{folder} is not a transformers model folder (no config.json)")
    config = transformers.AutoConfig.from_pretrained(folder)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    if cls is None:
        raise KronfactError(f"{folder}/config.json names architectures {names}, none a transformers class; build the "
                            f"model yourself and call kronfact.load('{folder / WEIGHTS_NAME}', model)")
    return config, cls


def read_kronfact_json(path: Path) -> list[CompressedModule]:
    """The compressed modules listed in a folder's kronfact.json, checked (format version, entries)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KronfactError(f"{path} is not valid JSON ({e})") from None
    version = info.get("kronfact_format") if isinstance(info, dict) else None
    if version != FORMAT_VERSION:
        raise KronfactError(f"{path} uses kronfact format {version!r}, but this kronfact reads format "
                            f"{FORMAT_VERSION!r}; upgrade kronfact to read it")
    modules = parse_modules(info.get("modules"), str(path))
    if not modules:
        raise KronfactError(f"{path} lists no compressed module; a folder without compressed layers has no "
                            "kronfact.json")
    return modules


def _load_plain(path: Path, cls: type, kw: dict[str, Any]) -> nn.Module:
    """transformers' own loader (never a pickle), refusing every tensor it would not read from the file.

    transformers re-initialises missing tensors and tensors whose shape does not fit the config, drops
    unexpected ones and casts integer tensors to the parameter's dtype, with a report on stderr; a
    model built that way computes on random weights. Each of those is a KronfactError here instead.
    """
    from transformers.utils import logging as hf_logging

    headers = open_checkpoint(path).tensors  # corrupt, truncated or lying headers fail here, cheaply
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the problems are raised below, in one line
    try:
        model, info = cls.from_pretrained(path, use_safetensors=True, output_loading_info=True,
                                          ignore_mismatched_sizes=True, **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = []
    if mismatched := sorted(info["mismatched_keys"]):
        problems.append("shapes that do not fit its config.json: " + listed(
            [f"{k} {tuple(file)} in the file, {tuple(want)} in the model" for k, file, want in mismatched]))
    if missing := sorted(info["missing_keys"]):
        problems.append(f"missing from the file: {listed(missing)}")
    if unexpected := sorted(info["unexpected_keys"]):
        problems.append(f"in the file but not in the model: {listed(unexpected)}")
    floating = [k for k, t in model.state_dict().items() if t.is_floating_point()]
    if integral := sorted(n for n, t in headers.items() if t.dtype not in FLOAT_DTYPES
                          and any(k == n or k.endswith("." + n) for k in floating)):
        problems.append("integer or bool tensors where the model holds floating-point weights: "
                        + listed([f"{n} ({headers[n].dtype})" for n in integral]))
    if problems:
        compressed = any(k.endswith((".a", ".b")) for k in info["unexpected_keys"])
        raise KronfactError(f"{path} does not fit its {cls.__name__} config: " + "; ".join(problems)
                            + (f". It looks like a kronfact-compressed folder without its {KRONFACT_JSON}: "
                               "restore that file, or compress the original again" if compressed else
                               ". Loading it would compute on weights that were never read; use the folder's "
                               "original config.json, or re-save the model"))
    return model


def verify_folder(path: str | os.PathLike) -> dict[CompressedModule, int]:
    """The compressed modules of a :func:`save_pretrained` folder → their parameter counts, after checking
    kronfact.json against model.safetensors' header (no tensor is read): both list the same modules and
    the file holds each module's tensors in the shapes its entry implies.
    """
    path = Path(path)
    in_json = read_kronfact_json(path / KRONFACT_JSON)
    entries, shapes, _ = read_file_header(path / WEIGHTS_NAME)
    if entries != in_json:
        raise KronfactError(f"{path / KRONFACT_JSON} and {path / WEIGHTS_NAME} disagree on the compressed modules; "
                            "the folder was modified after saving — save it again")
    params = {}
    for e in in_json:
        want = {f"{e.name}.{k}": tuple(t.shape)
                for k, t in empty_layer(e, "meta", torch.float32, str(path)).state_dict().items()}
        if bad := [k for k in want if shapes.get(k) != want[k]]:
            raise KronfactError(f"{path / WEIGHTS_NAME} does not hold what {KRONFACT_JSON} describes: {bad[0]} is "
                                f"{shapes.get(bad[0], 'missing')} in the file, {want[bad[0]]} by its entry; "
                                "save the model again")
        params[e] = sum(math.prod(shape) for shape in want.values())
    return params


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    """The transformers model saved at ``path`` by :func:`save_pretrained`, in eval mode.

    Built from config.json (class ``config.architectures[0]``; nothing is downloaded), restructured
    from kronfact.json and loaded from model.safetensors; tied weights re-tied. Forward, generate()
    and training work as usual. A folder without kronfact.json is loaded by transformers itself, and
    ``path`` may also be one .safetensors file with config.json beside it. Every tensor the model
    holds must come from the file: anything missing, unexpected, of the wrong shape or an integer
    where the model holds floats is a KronfactError naming it.
    """
    import transformers

    path = Path(path)
    folder = path.parent if path.is_file() else path
    config, cls = model_class(folder)
    kw = {} if dtype is None else {"dtype": dtype}
    if path.is_dir() and not (path / KRONFACT_JSON).is_file():
        model = _load_plain(path, cls, kw)
        return model if device is None else model.to(device)
    if path.is_dir():
        verify_folder(path)  # kronfact.json against the weights' header, before the skeleton is built
    with parameters_on_meta():  # the original's dense weights are never allocated
        model = cls._from_config(config, **kw)
    if path.is_file():
        load(path, model, require_metadata=False)
    else:
        load(path / WEIGHTS_NAME, model)
    model.tie_weights()
    if unloaded := [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]:
        raise KronfactError(f"{path}: {cls.__name__} holds tensors the file does not supply and the config does not "
                            f"derive: {listed(unloaded)}; save the model again with kronfact.save_pretrained")
    if (folder / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    model.eval()
    return model if device is None else model.to(device)
