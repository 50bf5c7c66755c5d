"""Persistence of compressed models: safetensors files, Hugging Face folders, and merging back.

A compressed model is an ordinary model some of whose nn.Linear / Conv1D modules became KronLinear.
:func:`save` writes one safetensors file holding every tensor of ``model.state_dict()`` (tied tensors
once) and, as string metadata, ``kronfact_format`` and ``kronfact_modules``: a JSON list with one
entry per KronLinear (name, in_features, out_features, shape_a, rank, orientation, bias). :func:`load`
rebuilds those modules inside an uncompressed skeleton of the same architecture and loads the tensors:
a bit-exact round trip. :func:`save_pretrained` / :func:`from_pretrained` do the same for a
transformers folder (config.json, model.safetensors, kronfact.json). :func:`merge` turns every
KronLinear back into the layer type it replaced, holding the dense product.

Nothing is unpickled; every check happens before the first change to a model or a file.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import _remove_duplicate_names, load_file, save_file
from torch import Tensor, nn

from .atomic import staged_dir, staged_file
from .layer import ORIENTATIONS, KronLinear
from .modules import is_conv1d, is_eligible, linear_weight
from .prune import PrunedLinear

FORMAT_VERSION = "1"
WEIGHTS_NAME = "model.safetensors"
KRONFACT_JSON = "kronfact.json"
# Shown in error messages: at most this many offending names.
_MAX_LISTED = 8
_KINDS = ("kron", "pruned")


@dataclass(frozen=True)
class CompressedModule:
    """The metadata of one KronLinear: enough to rebuild it, empty, in place of ``name``."""

    name: str
    in_features: int
    out_features: int
    shape_a: tuple[int, int]
    rank: int
    orientation: str
    bias: bool
    in_perm: bool = False  # gather buffers of a permuted layer (kronfact.permute); optional keys
    out_perm: bool = False
    kind: str = "kron"  # or "pruned": a PrunedLinear (shape_a = its (out, in), B 1×1, rank 1); optional key

    @classmethod
    def of(cls, name: str, layer: KronLinear | PrunedLinear) -> CompressedModule:
        if isinstance(layer, PrunedLinear):
            return cls(name, layer.in_features, layer.out_features, (layer.out_features, layer.in_features), 1,
                       "linear", layer.bias is not None, kind="pruned")
        return cls(name, layer.in_features, layer.out_features, layer.shape_a, layer.rank, layer.orientation,
                   layer.bias is not None, layer.in_perm is not None, layer.out_perm is not None)

    @classmethod
    def from_dict(cls, entry: Any, source: str) -> CompressedModule:
        """Parse one metadata entry, or raise ValueError naming ``source`` and what is wrong."""
        ints = ("in_features", "out_features", "rank")
        optional = {"in_perm", "out_perm", "kind"}
        ok = (isinstance(entry, dict) and set(cls.__dataclass_fields__) - optional <= set(entry)
              and set(entry) <= set(cls.__dataclass_fields__)
              and all(isinstance(entry.get(k, False), bool) for k in ("in_perm", "out_perm"))
              and entry.get("kind", "kron") in _KINDS
              and isinstance(entry["name"], str) and entry["name"] != ""
              and all(isinstance(entry[k], int) and not isinstance(entry[k], bool) for k in ints)
              and isinstance(entry["shape_a"], list) and len(entry["shape_a"]) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in entry["shape_a"])
              and entry["orientation"] in ORIENTATIONS and isinstance(entry["bias"], bool))
        if not ok:
            raise ValueError(f"{source}: malformed compressed-module entry {entry!r}; expected keys "
                             f"{sorted(cls.__dataclass_fields__)} with a non-empty name, int sizes, shape_a "
                             f"[m1, n1], orientation in {ORIENTATIONS}, bias (and optional in_perm, out_perm) "
                             f"true/false, kind in {_KINDS})")
        return cls(**{**entry, "shape_a": tuple(entry["shape_a"])})

    def to_dict(self) -> dict[str, Any]:
        entry = {**asdict(self), "shape_a": list(self.shape_a)}
        return {k: v for k, v in entry.items()  # optional keys only when they differ from their default
                if not ((k in ("in_perm", "out_perm") and not v) or (k == "kind" and v == "kron"))}


def compressed_modules(model: nn.Module) -> list[CompressedModule]:
    """One entry per KronLinear and PrunedLinear in ``model``, in ``named_modules`` order."""
    return [CompressedModule.of(name, m) for name, m in model.named_modules()
            if isinstance(m, (KronLinear, PrunedLinear))]


# ------------------------------------------------------------------------------------------------- files


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Run ``write(tmp)`` on a temp file next to ``path``, then rename it over ``path``."""
    if not path.parent.is_dir():
        raise ValueError(f"cannot save to {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise ValueError(f"cannot save to {path}: it is a directory; give a file name such as {path / WEIGHTS_NAME}")
    with staged_file(path) as tmp:
        write(str(tmp))


def _state_to_save(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every shared tensor once, as safetensors' save_model does.

    Of a tied group the name kept is not one of transformers' tied targets (e.g. ``lm_head.weight``
    goes, ``transformer.wte.weight`` stays), so the file is also what transformers expects.
    """
    state = model.state_dict()
    tied_targets = list(getattr(model, "all_tied_weights_keys", None) or {})
    for aliases in _remove_duplicate_names(state, discard_names=tied_targets).values():
        for name in aliases:
            del state[name]
    return {name: t.contiguous() for name, t in state.items()}


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (compressed or not) to one safetensors file at ``path``, atomically.

    Holds every parameter and persistent buffer (KronLinear factors ``a`` (r, m1, n1), ``b`` (r, m2, n2)
    included; tied tensors once) and the metadata :func:`load` needs to restructure a skeleton.
    """
    metadata = {"format": "pt", "kronfact_format": FORMAT_VERSION,
                "kronfact_modules": json.dumps([e.to_dict() for e in compressed_modules(model)])}
    state = _state_to_save(model)
    _atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata))


def _read_header(path: Path) -> tuple[list[CompressedModule], dict[str, tuple[int, ...]]]:
    """The compressed modules and the tensor shapes recorded in a file written by :func:`save`."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt — "
                         "save the model again") from None
    version = metadata.get("kronfact_format")
    if version is None:
        raise ValueError(f"{path} has no kronfact metadata (it was not written by kronfact.save); load a plain "
                         "safetensors file with safetensors.torch.load_model")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} uses kronfact format {version!r}, but this kronfact reads format "
                         f"{FORMAT_VERSION!r}; upgrade kronfact to read it")
    return _parse_modules(metadata.get("kronfact_modules"), str(path)), shapes


def _parse_modules(text: Any, source: str) -> list[CompressedModule]:
    try:
        entries = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: the compressed-module list is not valid JSON ({e})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{source}: the compressed-module list must be a JSON list, got {type(entries).__name__}")
    modules = [CompressedModule.from_dict(e, source) for e in entries]
    names = [m.name for m in modules]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: a module is listed twice among {names}")
    return modules


def _listed(names: list[str]) -> str:
    more = f" … and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _plan(model: nn.Module, entries: list[CompressedModule], source: str) -> dict[str, nn.Module]:
    """The empty KronLinear / PrunedLinear to put at each recorded name, after checking it fits the skeleton."""
    modules = dict(model.named_modules())
    layers = {}
    for e in entries:
        module = modules.get(e.name)
        replaced = "Conv1D" if e.orientation == "conv1d" else "Linear"
        if module is None:
            candidates = [n for n, m in modules.items() if is_eligible(m) or isinstance(m, KronLinear)]
            close = difflib.get_close_matches(e.name, candidates, n=3, cutoff=0.5)
            raise ValueError(f"{source}: compressed module {e.name!r} does not exist in this "
                             f"{type(model).__name__}" + (f" (closest: {', '.join(close)})" if close else "")
                             + "; load into a skeleton of the same architecture and config")
        if isinstance(module, (KronLinear, PrunedLinear)) and CompressedModule.of(e.name, module) == e:
            continue  # already restructured the same way
        if e.kind == "pruned" and is_eligible(module) and not isinstance(module, PrunedLinear):
            if (module.bias is not None) != e.bias:
                raise ValueError(f"{source}: {e.name!r} has {'a' if module.bias is not None else 'no'} bias in "
                                 f"this model, but {'a' if e.bias else 'no'} bias in the file")
            weight = linear_weight(module)
            layers[e.name] = PrunedLinear(e.in_features, e.out_features, bias=e.bias, device=weight.device,
                                          dtype=weight.dtype).train(module.training).requires_grad_(
                                              weight.requires_grad)
            continue
        if not is_eligible(module) or is_conv1d(module) != (e.orientation == "conv1d"):
            raise ValueError(f"{source}: {e.name!r} is a {type(module).__name__} in this model, but the file "
                             f"holds a KronLinear that replaced a {replaced}")
        weight = linear_weight(module)
        if tuple(weight.shape) != (e.out_features, e.in_features):
            raise ValueError(f"{source}: shape mismatch at {e.name!r}: (out, in) = {tuple(weight.shape)} in this "
                             f"model, {(e.out_features, e.in_features)} in the file; is it the same config?")
        if (module.bias is not None) != e.bias:
            raise ValueError(f"{source}: {e.name!r} has {'a' if module.bias is not None else 'no'} bias in this "
                             f"model, but {'a' if e.bias else 'no'} bias in the file")
        try:
            layer = KronLinear(e.in_features, e.out_features, e.shape_a, e.rank, bias=e.bias, device=weight.device,
                               dtype=weight.dtype, orientation=e.orientation)
        except ValueError as err:
            raise ValueError(f"{source}: compressed module {e.name!r}: {err}") from None
        device = weight.device  # identity placeholders, overwritten by the file's orders
        layer.set_permutations(torch.arange(e.in_features, device=device) if e.in_perm else None,
                               torch.arange(e.out_features, device=device) if e.out_perm else None)
        layers[e.name] = layer.train(module.training).requires_grad_(weight.requires_grad)
    return layers


def _aliases(model: nn.Module, name: str) -> list[str]:
    """Every name under which the module called ``name`` is reachable (shared modules have several)."""
    module = model.get_submodule(name)
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module]


def _check_tensors(model: nn.Module, layers: dict[str, nn.Module], shapes: dict[str, tuple[int, ...]],
                   source: str) -> None:
    """Raise unless the file's tensors are exactly those of ``model`` once ``layers`` are in place."""
    expected = model.state_dict()
    for name, layer in layers.items():
        for alias in _aliases(model, name):
            for key in model.get_submodule(alias).state_dict(prefix=f"{alias}."):
                del expected[key]
            expected.update(layer.state_dict(prefix=f"{alias}."))
    if any(t.device.type == "meta" for t in expected.values()):
        raise ValueError("the skeleton holds meta tensors; materialize it first, e.g. model.to_empty(device='cpu')")
    # Tied tensors: the file holds one name of each shared group (as save_model writes it).
    tied = {a for group in _remove_duplicate_names(expected, preferred_names=list(shapes)).values() for a in group}
    problems = [f"shape mismatch at {k}: {shapes[k]} in the file, {tuple(expected[k].shape)} in the model"
                for k in shapes if k in expected and shapes[k] != tuple(expected[k].shape)]
    if missing := sorted(set(expected) - set(shapes) - tied):
        problems.append(f"missing from the file: {_listed(missing)}")
    if unexpected := sorted(set(shapes) - set(expected)):
        problems.append(f"in the file but not in the model: {_listed(unexpected)}")
    if problems:
        raise ValueError(f"{source} does not fit this {type(model).__name__}: " + "; ".join(problems)
                         + ". Load into a skeleton of the same architecture and config")


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Restructure the skeleton ``model`` from the metadata of ``path`` and load its tensors; in place.

    ``model`` is an uncompressed model of the saved architecture (e.g. built from its config). Each
    recorded module is replaced by a KronLinear (or, for pruned neurons, a smaller PrunedLinear) on the
    device and in the dtype of the module it replaces. Any mismatch raises ValueError before the model
    is touched. Returns ``model``.
    """
    path = Path(path)
    entries, shapes = _read_header(path)
    layers = _plan(model, entries, str(path))
    _check_tensors(model, layers, shapes, str(path))
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: reading the tensors failed ({e}); the file is corrupt — save it again") from None
    for name, layer in layers.items():  # the file's gather orders must be permutations (checked before any change)
        if isinstance(layer, KronLinear) and (layer.in_perm is not None or layer.out_perm is not None):
            try:
                layer.set_permutations(state[f"{name}.in_perm"] if layer.in_perm is not None else None,
                                       state[f"{name}.out_perm"] if layer.out_perm is not None else None)
            except (KeyError, ValueError) as err:
                raise ValueError(f"{path}: compressed module {name!r}: bad permutation ({err})") from None
    for alias, layer in [(a, layer) for name, layer in layers.items() for a in _aliases(model, name)]:
        model.set_submodule(alias, layer)
    model.load_state_dict(state, strict=False)  # complete: checked by _check_tensors
    return model


# ----------------------------------------------------------------------------------- transformers folders


def save_pretrained(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, *,
                    overwrite: bool = False) -> None:
    """Write a transformers folder at ``path``: config.json, generation_config.json (if any),
    model.safetensors (:func:`save`), tokenizer files (if ``tokenizer``), and kronfact.json listing the
    compressed modules (absent when there are none: a merged model gives a plain transformers checkpoint).

    Written to a temp folder next to ``path`` and renamed last. A non-empty ``path`` is replaced only
    with ``overwrite=True``.
    """
    if not callable(getattr(getattr(model, "config", None), "save_pretrained", None)):
        raise ValueError(f"save_pretrained needs a transformers model (with a .config); got "
                         f"{type(model).__name__} — use kronfact.save(model, file) for other torch modules")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"{path} already exists and is not empty; pass overwrite=True to replace it")
    with staged_dir(path) as tmp:
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.dtype = model.dtype
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save(model, tmp / WEIGHTS_NAME)
        if entries := compressed_modules(model):
            from . import __version__

            info = {"kronfact_format": FORMAT_VERSION, "kronfact_version": __version__,
                    "modules": [e.to_dict() for e in entries]}
            (tmp / KRONFACT_JSON).write_text(json.dumps(info, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def model_class(folder: Path) -> tuple[Any, type]:
    """(config, transformers class) named by ``folder``/config.json's ``architectures``; nothing downloaded."""
    import transformers

    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a transformers model folder (no config.json)")
    config = transformers.AutoConfig.from_pretrained(folder)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    if cls is None:
        raise ValueError(f"{folder}/config.json names architectures {names}, none a transformers class; build the "
                         f"model yourself and call kronfact.load('{folder / WEIGHTS_NAME}', model)")
    return config, cls


def read_kronfact_json(path: Path) -> list[CompressedModule]:
    """The compressed modules listed in a folder's kronfact.json, checked (format version, entries)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    version = info.get("kronfact_format") if isinstance(info, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} uses kronfact format {version!r}, but this kronfact reads format "
                         f"{FORMAT_VERSION!r}; upgrade kronfact to read it")
    modules = _parse_modules(info.get("modules"), str(path))
    if not modules:
        raise ValueError(f"{path} lists no compressed module; a folder without Kronecker layers has no kronfact.json")
    return modules


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    """The transformers model saved at ``path`` by :func:`save_pretrained`, in eval mode.

    Built from config.json (class ``config.architectures[0]``; nothing is downloaded), restructured
    from kronfact.json and loaded from model.safetensors; tied weights re-tied. Forward, generate()
    and training work as usual. A folder without kronfact.json is loaded by transformers itself.
    """
    import transformers

    path = Path(path)
    config, cls = model_class(path)
    kw = {} if dtype is None else {"dtype": dtype}
    if not (path / KRONFACT_JSON).is_file():
        model = cls.from_pretrained(path, use_safetensors=True, **kw)  # never unpickle a .bin
        return model if device is None else model.to(device)
    info_path = path / KRONFACT_JSON
    listed = read_kronfact_json(info_path)
    model = cls._from_config(config, **kw)
    load(path / WEIGHTS_NAME, model)
    if compressed_modules(model) != listed:
        raise ValueError(f"{info_path} and {path / WEIGHTS_NAME} disagree on the compressed modules; "
                         "the folder was modified after saving — save it again")
    model.tie_weights()
    if (path / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    model.eval()
    return model if device is None else model.to(device)


# ------------------------------------------------------------------------------------------------- merge


def _merged(layer: KronLinear) -> nn.Module:
    """The layer type ``layer`` replaced (nn.Linear or Conv1D) holding its dense product."""
    if layer.orientation == "linear":
        dense = layer.to_linear()
    else:
        from transformers.pytorch_utils import Conv1D

        with torch.device(layer.a.device):
            dense = Conv1D(layer.out_features, layer.in_features).to(layer.a.dtype)
        with torch.no_grad():
            dense.weight.copy_(layer.to_dense().T)  # Conv1D stores (in, out)
            if layer.bias is None:
                dense.bias.zero_()
            else:
                dense.bias.copy_(layer.bias)
    return dense.train(layer.training).requires_grad_(layer.a.requires_grad)


def merge(model: nn.Module) -> nn.Module:
    """Replace every KronLinear in ``model`` by its original layer type holding the dense weight, in place.

    nn.Linear gets weight (out, in) = Σ a_i ⊗ b_i; a Conv1D (orientation "conv1d") gets its transpose
    (in, out). Device, dtype, train mode and requires_grad follow the KronLinear. Returns ``model``
    (the merged layer itself when ``model`` is a KronLinear).
    """
    if isinstance(model, KronLinear):
        return _merged(model)
    layers = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, KronLinear)]
    merged = {id(m): _merged(m) for _, m in layers}  # one module per layer, even when it has several names
    for name, layer in layers:
        model.set_submodule(name, merged[id(layer)])
    return model
