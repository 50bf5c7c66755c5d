"""Persistence of compressed models: safetensors files, Hugging Face folders, and merging back.

A compressed model is an ordinary model some of whose nn.Linear / Conv1D modules became KronLinear.
:func:`save` writes one safetensors file holding every tensor of ``model.state_dict()`` (tied tensors
once) and, as string metadata, ``kronfact_format`` and ``kronfact_modules``: a JSON list with one
entry per KronLinear (name, in_features, out_features, shape_a, rank, orientation, bias). :func:`load`
rebuilds those modules inside an uncompressed skeleton of the same architecture and loads the tensors:
a bit-exact round trip. :func:`save_pretrained` / :func:`from_pretrained` do the same for a
transformers folder (config.json, model.safetensors, kronfact.json). :func:`merge` turns every
KronLinear back into the layer type it replaced, holding the dense product.

Nothing is unpickled; every check happens before the first change to a model or a file. Transformers
folders (save_pretrained / from_pretrained) are :mod:`kronfact.pretrained`'s.
"""

from __future__ import annotations

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

from .atomic import staged_file
from .checkpoint import FLOAT_DTYPES, open_checkpoint
from .errors import KronfactError
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
            raise KronfactError(f"{source}: malformed compressed-module entry {entry!r}; expected keys "
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
        raise KronfactError(f"cannot save to {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise KronfactError(f"cannot save to {path}: it is a directory; give a file name such as {path / WEIGHTS_NAME}")
    with staged_file(path) as tmp:
        write(str(tmp))


def write_state(state: dict[str, Tensor], modules: list[CompressedModule], path: str | os.PathLike,
                tied_targets: list[str] | tuple[str, ...] = ()) -> None:
    """Write a state dict to one safetensors file at ``path``, atomically, with the metadata :func:`load`
    needs (``modules``). Tensors sharing storage (tied weights) are written once, as safetensors'
    save_model does; the name kept is not one of ``tied_targets`` (transformers' tied names, e.g.
    ``lm_head.weight`` goes, ``transformer.wte.weight`` stays), so the file is what transformers expects.
    """
    state = dict(state)
    for aliases in _remove_duplicate_names(state, discard_names=list(tied_targets)).values():
        for name in aliases:
            del state[name]
    metadata = {"format": "pt", "kronfact_format": FORMAT_VERSION,
                "kronfact_modules": json.dumps([e.to_dict() for e in modules])}
    tensors = {name: t.detach().contiguous() for name, t in state.items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata))


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (compressed or not) to one safetensors file at ``path``, atomically.

    Holds every parameter and persistent buffer (KronLinear factors ``a`` (r, m1, n1), ``b`` (r, m2, n2)
    included; tied tensors once) and the metadata :func:`load` needs to restructure a skeleton.
    """
    write_state(model.state_dict(), compressed_modules(model), path,
                list(getattr(model, "all_tied_weights_keys", None) or {}))


def read_file_header(path: Path, plain_ok: bool = False) -> tuple[list[CompressedModule], dict[str, tuple[int, ...]],
                                                               dict[str, str]]:
    """The compressed modules, tensor shapes and safetensors dtypes recorded in a file written by :func:`save`
    (with ``plain_ok``, any safetensors file: no kronfact metadata means no compressed module)."""
    if not path.is_file():
        raise KronfactError(f"{path} does not exist or is not a file")
    headers = open_checkpoint(path).tensors  # holes, trailing bytes, unknown dtypes, lying offsets
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise KronfactError(f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt — "
                            "save the model again") from None
    shapes, dtypes = {name: t.shape for name, t in headers.items()}, {name: t.dtype for name, t in headers.items()}
    version = metadata.get("kronfact_format")
    if version is None and plain_ok:
        return [], shapes, dtypes
    if version is None:
        raise KronfactError(f"{path} has no kronfact metadata (it was not written by kronfact.save); load a plain "
                            "safetensors file with safetensors.torch.load_model")
    if version != FORMAT_VERSION:
        raise KronfactError(f"{path} uses kronfact format {version!r}, but this kronfact reads format "
                            f"{FORMAT_VERSION!r}; upgrade kronfact to read it")
    return parse_modules(metadata.get("kronfact_modules"), str(path)), shapes, dtypes


def parse_modules(text: Any, source: str) -> list[CompressedModule]:
    try:
        entries = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as e:
        raise KronfactError(f"{source}: the compressed-module list is not valid JSON ({e})") from None
    if not isinstance(entries, list):
        raise KronfactError(f"{source}: the compressed-module list must be a JSON list, got {type(entries).__name__}")
    modules = [CompressedModule.from_dict(e, source) for e in entries]
    names = [m.name for m in modules]
    if len(set(names)) != len(names):
        raise KronfactError(f"{source}: a module is listed twice among {names}")
    return modules


def listed(names: list[str]) -> str:
    more = f" … and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def empty_layer(e: CompressedModule, device: torch.device | str, dtype: torch.dtype, source: str) -> nn.Module:
    """The KronLinear or PrunedLinear that ``e`` describes, uninitialised (identity gather orders)."""
    if e.kind == "pruned":
        return PrunedLinear(e.in_features, e.out_features, bias=e.bias, device=device, dtype=dtype)
    try:
        layer = KronLinear(e.in_features, e.out_features, e.shape_a, e.rank, bias=e.bias, device=device,
                           dtype=dtype, orientation=e.orientation)
    except ValueError as err:
        raise KronfactError(f"{source}: compressed module {e.name!r}: {err}") from None
    layer.set_permutations(torch.arange(e.in_features, device=device) if e.in_perm else None,
                           torch.arange(e.out_features, device=device) if e.out_perm else None)
    return layer


def _empty_layers(model: nn.Module, entries: list[CompressedModule], source: str) -> dict[str, nn.Module]:
    """The empty KronLinear / PrunedLinear to put at each recorded name, after checking it fits the skeleton."""
    modules = dict(model.named_modules())
    layers = {}
    for e in entries:
        module = modules.get(e.name)
        replaced = "Conv1D" if e.orientation == "conv1d" else "Linear"
        if module is None:
            candidates = [n for n, m in modules.items() if is_eligible(m) or isinstance(m, KronLinear)]
            close = difflib.get_close_matches(e.name, candidates, n=3, cutoff=0.5)
            raise KronfactError(f"{source}: compressed module {e.name!r} does not exist in this "
                                f"{type(model).__name__}" + (f" (closest: {', '.join(close)})" if close else "")
                                + "; load into a skeleton of the same architecture and config")
        if isinstance(module, (KronLinear, PrunedLinear)) and CompressedModule.of(e.name, module) == e:
            continue  # already restructured the same way
        if e.kind == "pruned" and is_eligible(module) and not isinstance(module, PrunedLinear):
            if (module.bias is not None) != e.bias:
                raise KronfactError(f"{source}: {e.name!r} has {'a' if module.bias is not None else 'no'} bias in "
                                    f"this model, but {'a' if e.bias else 'no'} bias in the file")
            weight = linear_weight(module)
            layers[e.name] = empty_layer(e, weight.device, weight.dtype, source).train(
                module.training).requires_grad_(weight.requires_grad)
            continue
        if not is_eligible(module) or is_conv1d(module) != (e.orientation == "conv1d"):
            raise KronfactError(f"{source}: {e.name!r} is a {type(module).__name__} in this model, but the file "
                                f"holds a KronLinear that replaced a {replaced}")
        weight = linear_weight(module)
        if tuple(weight.shape) != (e.out_features, e.in_features):
            raise KronfactError(f"{source}: shape mismatch at {e.name!r}: (out, in) = {tuple(weight.shape)} in this "
                                f"model, {(e.out_features, e.in_features)} in the file; is it the same config?")
        if (module.bias is not None) != e.bias:
            raise KronfactError(f"{source}: {e.name!r} has {'a' if module.bias is not None else 'no'} bias in this "
                                f"model, but {'a' if e.bias else 'no'} bias in the file")
        layer = empty_layer(e, weight.device, weight.dtype, source)  # gather orders: the file's, at load
        layers[e.name] = layer.train(module.training).requires_grad_(weight.requires_grad)
    return layers


def _aliases(model: nn.Module, name: str) -> list[str]:
    """Every name under which the module called ``name`` is reachable (shared modules have several)."""
    module = model.get_submodule(name)
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module]


def _check_tensors(model: nn.Module, layers: dict[str, nn.Module], shapes: dict[str, tuple[int, ...]],
                   dtypes: dict[str, str], source: str) -> dict[str, list[str]]:
    """Raise unless the file's tensors are exactly those of ``model`` once ``layers`` are in place; return
    the tied names: {name in the file: [the names sharing it, not in the file]}."""
    expected = model.state_dict(keep_vars=True)  # the tensors themselves: tied ones are one object
    for name, layer in layers.items():
        for alias in _aliases(model, name):
            for key in model.get_submodule(alias).state_dict(prefix=f"{alias}."):
                del expected[key]
            expected.update(layer.state_dict(prefix=f"{alias}.", keep_vars=True))
    # Tied tensors: the file holds one name of each shared group (as save_model writes it). Meta tensors
    # have no storage to compare: there, tied means the same tensor object.
    if any(t.is_meta for t in expected.values()):
        groups: dict[int, list[str]] = {}
        for k, t in expected.items():
            groups.setdefault(id(t), []).append(k)
        ties = {min(g, key=lambda k: (k not in shapes, k)): g for g in groups.values() if len(g) > 1}
        ties = {kept: [k for k in g if k != kept] for kept, g in ties.items()}
    else:
        ties = _remove_duplicate_names(expected, preferred_names=list(shapes))
    tied = {a for group in ties.values() for a in group}
    problems = [f"shape mismatch at {k}: {shapes[k]} in the file, {tuple(expected[k].shape)} in the model"
                for k in shapes if k in expected and shapes[k] != tuple(expected[k].shape)]
    problems += [f"{k} is {dtypes[k]} in the file but {expected[k].dtype} in the model" for k in shapes
                 if k in expected and expected[k].is_floating_point() and dtypes[k] not in FLOAT_DTYPES]
    if missing := sorted(set(expected) - set(shapes) - tied):
        problems.append(f"missing from the file: {listed(missing)}")
    if unexpected := sorted(set(shapes) - set(expected)):
        problems.append(f"in the file but not in the model: {listed(unexpected)}")
    if problems:
        raise KronfactError(f"{source} does not fit this {type(model).__name__}: " + "; ".join(problems)
                            + ". Load into a skeleton of the same architecture and config")
    return ties


def load(path: str | os.PathLike, model: nn.Module, *, require_metadata: bool = True) -> nn.Module:
    """Restructure the skeleton ``model`` from the metadata of ``path`` and load its tensors; in place.

    ``model`` is an uncompressed model of the saved architecture (e.g. built from its config). Each
    recorded module is replaced by a KronLinear (or, for pruned neurons, a smaller PrunedLinear) on the
    device and in the dtype of the module it replaces. A skeleton with tensors on the meta device (no
    memory) takes the file's tensors as its own, in the skeleton's dtypes, and is re-tied. Any mismatch
    raises ValueError before the model is touched: a tensor missing, unexpected, misshapen, or an
    integer where the model holds floats.
    ``require_metadata=False`` also loads a plain safetensors file (no compressed module) as strictly.
    Returns ``model``.
    """
    path = Path(path)
    entries, shapes, dtypes = read_file_header(path, plain_ok=not require_metadata)
    layers = _empty_layers(model, entries, str(path))
    ties = _check_tensors(model, layers, shapes, dtypes, str(path))
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise KronfactError(f"{path}: reading the tensors failed ({e}); the file is corrupt — save it again") from None
    for name, layer in layers.items():  # the file's gather orders must be permutations (checked before any change)
        if isinstance(layer, KronLinear) and (layer.in_perm is not None or layer.out_perm is not None):
            try:
                layer.set_permutations(state[f"{name}.in_perm"] if layer.in_perm is not None else None,
                                       state[f"{name}.out_perm"] if layer.out_perm is not None else None)
            except (KeyError, ValueError) as err:
                raise KronfactError(f"{path}: compressed module {name!r}: bad permutation ({err})") from None
    for alias, layer in [(a, layer) for name, layer in layers.items() for a in _aliases(model, name)]:
        model.set_submodule(alias, layer)
    current = model.state_dict()
    if not any(t.is_meta for t in current.values()):
        model.load_state_dict(state, strict=False)  # complete: checked by _check_tensors
        return model
    # A skeleton without memory: the file's tensors become the model's (in its dtypes), then the ties. The factors
    # are read rather than mapped: laying out a mapped factor (eval mode) would keep its file pages resident beside
    # the copy, for as long as any tensor of the file is alive.
    with safe_open(path, "pt", backend="pread") as f:
        state.update({k: f.get_tensor(k) for name, layer in layers.items() if isinstance(layer, KronLinear)
                      for k in (f"{name}.a", f"{name}.b")})
    state = {k: v.to(current[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    for kept, names in ties.items():
        slots, attr = _slot(model, kept)
        for name in names:
            tied_slots, tied_attr = _slot(model, name)
            tied_slots[tied_attr] = slots[attr]
    del state  # the file's tensors are the model's now: laying a layer out frees its file-ordered factors
    for layer in layers.values():
        if isinstance(layer, KronLinear) and not layer.training:
            layer.lay_out()  # as eval() did for the skeleton's layers, before assignment replaced them
    return model


def _slot(model: nn.Module, name: str) -> tuple[dict[str, Any], str]:
    """The dict holding the parameter or buffer ``name`` of ``model``, and its key there."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    return (owner._parameters if attr in owner._parameters else owner._buffers), attr


# ------------------------------------------------------------------------------------------------- merge


def merge(model: nn.Module) -> nn.Module:
    """Replace every KronLinear in ``model`` by its original layer type holding the dense weight, in place.

    nn.Linear gets weight (out, in) = Σ a_i ⊗ b_i; a Conv1D (orientation "conv1d") gets its transpose
    (in, out). Device, dtype, train mode and requires_grad follow the KronLinear. Returns ``model``
    (the merged layer itself when ``model`` is a KronLinear).
    """
    if isinstance(model, KronLinear):
        return model.to_module()
    layers = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, KronLinear)]
    merged = {id(m): m.to_module() for _, m in layers}  # one module per layer, even when it has several names
    for name, layer in layers:
        model.set_submodule(name, merged[id(layer)])
    return model


# Moved to kronfact.pretrained; importable from here until the next minor release.
_MOVED = ("from_pretrained", "save_pretrained", "model_class", "read_kronfact_json", "verify_folder")


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'kronfact.io' has no attribute {name!r}")
    import warnings

    from . import pretrained

    warnings.warn(f"kronfact.io.{name} moved to kronfact.pretrained.{name}", DeprecationWarning, stacklevel=2)
    return getattr(pretrained, name)
