"""Declarative recipes: one TOML file names a model, how to compress it, how to recover it, how to evaluate it.

::

    name = "gpt2-krony-81m"
    [model]     name = "gpt2"  kind = "causal"           # hub id or local folder; causal | encoder | vision
    [compress]  init = "vanloan"  budget = 81e6          # or ratio = …, or per-layer shapes:
    [compress.layers."mlp.c_fc"]  shape_a = [768, 768]  rank = 1
    [train]     data = "openwebtext"  tokens = 1e8 …    # plus any kronfact.train.TrainConfig field
    [eval]      sets = ["wikitext-103", "lambada"]  protocol = "krony"
    [output]    dir = "runs/gpt2-krony-81m"

:func:`load_recipe` reads and validates a file (unknown keys, missing fields and wrong types are
ValueErrors naming the file and the key) and applies ``--set key=value`` overrides (dotted TOML keys,
values parsed as TOML, bare words as strings); relative paths resolve against the recipe's folder.
:func:`kronfact.run.run_recipe` runs it (load → compress → train → evaluate → save);
:mod:`kronfact.cli.recipe` is the ``kronfact recipe`` command.

Parameters are counted in full (every tensor once, position tables included).
"""

from __future__ import annotations

import json
import os
import sys
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import KronfactError
from .evaluate import Protocol
from .kron import INITS
from .surgery import METHODS, check_budget
from .train import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Kind = Literal["causal", "encoder", "vision"]


@dataclass
class ModelSpec:
    """[model]: a hub id or a local folder (``--model PATH`` replaces it)."""

    name: str
    kind: Kind = "causal"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # auto: cuda when available


@dataclass
class LayerRule:
    """[compress.layers."PATTERN"]: options for the modules one pattern selects."""

    shape_a: list[int] | None = None  # nn.Linear orientation (out, in) of A
    rank: int | None = None
    max_rank: int | None = None  # caps the rank the budget / ratio solver may pick for these modules
    init: Literal[INITS] | None = None
    prune_index: list[list[int]] | None = None


@dataclass
class CompressSpec:
    """[compress]: ``rules`` (patterns) with a ``budget`` / ``ratio`` / fixed ``shape_a`` + ``rank``,
    or ``layers`` (pattern → :class:`LayerRule`)."""

    rules: str | list[str] | None = None
    layers: dict[str, LayerRule] = field(default_factory=dict)
    budget: float | None = None  # total parameters of the compressed model, counted in full
    ratio: float | None = None
    shape_a: list[int] | None = None
    rank: int | None = None
    max_rank: int | None = None
    init: Literal[INITS] = "vanloan"
    method: Literal[METHODS] = "auto"
    calibration: str | None = None  # text for data-aware compression: a file, a folder of *.txt, or a dataset name
    calibration_windows: int = 32  # random windows (seed 0) of calibration_len tokens
    calibration_len: int = 256


@dataclass
class TrainSpec:
    """[train]: data plus any :class:`kronfact.train.TrainConfig` field (held in ``config``)."""

    data: str  # a text file, a folder of *.txt, or a dataset name (kronfact.data.TRAIN_SETS)
    val_data: str | None = None  # held-out text for validation: a file, or "dataset:split"
    holdout: float = 0.0  # or: this fraction of the training tokens (their tail) held out for validation
    data_tokens: int | None = None  # load at most this many training tokens (streamed datasets)
    distill_from_original: bool = True  # teacher = the uncompressed model (needed by distill / encoders)
    config: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class EvalSpec:
    """[eval]: causal models — perplexity on dataset names (kronfact.data.EVAL_SETS) or text files,
    LAMBADA on "lambada" (or "lambada:FILE", one example a line); encoders — mean cosine of mean-pooled
    embeddings to the uncompressed model over a text file's lines."""

    sets: list[str] = field(default_factory=list)
    protocol: Protocol = "sliding"
    context: int | None = None
    stride: int | None = None
    batch_size: int = 8
    max_tokens: int | None = None  # per set, for quick runs
    max_texts: int = 1000  # encoders / lambada: at most this many lines


@dataclass
class OutputSpec:
    dir: str | None = None  # default: runs/<name> beside the recipe file


@dataclass
class Recipe:
    name: str
    model: ModelSpec
    compress: CompressSpec
    description: str = ""
    reference: str = ""  # where the configuration comes from (paper, table)
    train: TrainSpec | None = None
    eval: EvalSpec = field(default_factory=EvalSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    source: str = field(default="", metadata={"toml": False})

    @property
    def out_dir(self) -> Path:
        """``[output].dir``, else ``runs/<name>`` beside the recipe file."""
        return Path(self.output.dir) if self.output.dir else Path(self.source or ".").parent / "runs" / self.name

    def rules(self) -> str | list[str] | dict[str, dict[str, Any]]:
        """The ``rules`` argument of :func:`kronfact.surgery.compress`."""
        if not self.compress.layers:
            return self.compress.rules or "mlp.*"
        rules = {}
        for pattern, rule in self.compress.layers.items():
            options = {k: v for k, v in asdict(rule).items() if v is not None}
            if "shape_a" in options:
                options["shape_a"] = tuple(options["shape_a"])
            if "prune_index" in options:
                options["prune_index"] = [tuple(p) for p in options["prune_index"]]
            rules[pattern] = options
        return rules

    def compress_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`kronfact.surgery.compress` besides ``rules``."""
        c = self.compress
        kw: dict[str, Any] = {"init": c.init, "method": c.method}
        if c.budget is not None:
            kw["budget"] = int(c.budget)
        if c.ratio is not None:
            kw["ratio"] = c.ratio
        if c.shape_a is not None:
            kw["shape_a"] = tuple(c.shape_a)
        if c.rank is not None:
            kw["rank"] = c.rank
        if c.max_rank is not None:
            kw["max_rank"] = c.max_rank
        return kw


# ------------------------------------------------------------------------------------------ validation


class _Invalid(KronfactError):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin in (list, tuple, dict):
        return f"{origin.__name__} of {', '.join(_describe(a) for a in typing.get_args(hint) if a is not ...)}"
    return "a table" if is_dataclass(hint) else getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the type ``hint`` (ints accepted for floats, lists for tuples), or _Invalid."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error is the clearest
            return _coerce(value, options[0], key)
        for arg in options:
            try:
                return _coerce(value, arg, key)
            except _Invalid:
                continue
    elif origin is Literal:
        if value in args:
            return value
    elif hint is type(None):
        if value is None:
            return None
    elif is_dataclass(hint):
        if isinstance(value, dict):
            return _build(hint, value, key)
    elif origin is list and isinstance(value, list):
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple and isinstance(value, list) and len(value) == len(args):
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    elif origin is dict and isinstance(value, dict):
        return {k: _coerce(v, args[1], f'{key}."{k}"') for k, v in value.items()}
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e8 written as a float
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise _Invalid(key, f"'{key}' must be {_describe(hint)}, got {value!r}")


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from a TOML table: unknown keys, missing fields, wrong types → _Invalid."""
    hints = typing.get_type_hints(cls)
    own = {f.name: f for f in fields(cls) if f.metadata.get("toml", True)}
    prefix = f"{where}." if where else ""
    extra: dict[str, Any] = {}
    if cls is TrainSpec:  # the rest of [train] is a TrainConfig
        extra = {k: table[k] for k in table if k not in own}
        table = {k: v for k, v in table.items() if k in own and k != "config"}
        known_cfg = {f.name for f in fields(TrainConfig)}
        for k in extra:
            if k not in known_cfg:
                raise _Invalid(prefix + k, f"unknown key '{prefix}{k}' (known: "
                                           f"{', '.join(sorted(set(own) - {'config'} | known_cfg))})")
    for k in table:
        if k not in own:
            raise _Invalid(prefix + k, f"unknown key '{prefix}{k}' (known: {', '.join(own)})")
    required = [n for n, f in own.items() if f.default is MISSING and f.default_factory is MISSING]
    for name in required:
        if name not in table:
            raise _Invalid(prefix + name, f"missing required key '{prefix}{name}'")
    values = {k: _coerce(v, hints[k], prefix + k) for k, v in table.items()}
    if cls is TrainSpec:
        cfg = {k: _coerce(v, typing.get_type_hints(TrainConfig)[k], prefix + k) for k, v in extra.items()}
        try:
            values["config"] = TrainConfig(**cfg)
        except ValueError as err:
            raise _Invalid(where, str(err)) from None
    return cls(**values)


def _check(recipe: Recipe) -> None:
    """Cross-field rules a type check cannot see."""
    c = recipe.compress
    try:
        check_budget(c.budget, c.ratio)
    except KronfactError as err:
        message = str(err).replace("budget=", "compress.budget").replace("ratio=", "compress.ratio")
        raise _Invalid("compress.budget", message) from None
    if c.layers and c.rules is not None:
        raise _Invalid("compress.rules", "give compress.rules or [compress.layers.*] tables, not both")
    for pattern, rule in c.layers.items():
        if rule.shape_a is not None and len(rule.shape_a) != 2:
            raise _Invalid(f'compress.layers."{pattern}".shape_a', "shape_a must be [rows, cols]")
        if rule.prune_index is not None and any(len(p) != 2 for p in rule.prune_index):
            raise _Invalid(f'compress.layers."{pattern}".prune_index', "prune_index entries must be [p, q] pairs")
    if c.shape_a is not None and len(c.shape_a) != 2:
        raise _Invalid("compress.shape_a", "shape_a must be [rows, cols]")
    if c.calibration_windows < 1 or c.calibration_len < 2:
        raise _Invalid("compress.calibration_windows", "compress.calibration_windows must be ≥ 1 and "
                                                       "compress.calibration_len ≥ 2")
    t = recipe.train
    if t is not None and not 0 <= t.holdout < 1:
        raise _Invalid("train.holdout", f"train.holdout is a fraction of the training tokens in [0, 1), "
                                        f"got {t.holdout}")
    if t is not None and t.holdout and t.val_data is not None:
        raise _Invalid("train.holdout", "give train.val_data or train.holdout, not both")
    if recipe.model.kind == "vision" and recipe.train is not None:
        raise _Invalid("train", "recovery training is implemented for causal LMs and text encoders, not vision "
                                "models: remove [train]")
    if recipe.model.kind == "vision" and recipe.eval.sets:
        raise _Invalid("eval.sets", "no evaluation sets exist for vision models yet: remove eval.sets")
    if recipe.model.kind == "encoder" and recipe.train is not None and not recipe.train.distill_from_original:
        raise _Invalid("train.distill_from_original", "encoders recover by distillation from the original model")


def _parse_override(item: str) -> tuple[str, dict[str, Any]]:
    """'a.b=VALUE' → ('a.b', {'a': {'b': value}}): VALUE as TOML, else as a plain string."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise KronfactError(f"--set expects key=value (e.g. train.lr=3e-4), got {item!r}")
    for text in (value.strip(), json.dumps(value.strip())):
        try:
            return key, tomllib.loads(f"{key} = {text}")
        except tomllib.TOMLDecodeError:
            continue
    raise KronfactError(f"--set {item!r}: {key!r} is not a dotted key (quote parts holding dots: "
                        'compress.layers."mlp.c_fc".rank=2)')


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


# The keys that may hold paths (or hub ids / dataset names); "lambada:FILE" eval sets carry theirs after the colon.
_PATH_KEYS = (("model", "name"), ("compress", "calibration"), ("train", "data"), ("train", "val_data"),
              ("output", "dir"))


def _resolved(value: Any, base: Path, always: bool = False) -> Any:
    """A relative path → the same path under ``base``; hub ids and dataset names (no such file) stay as they are."""
    if not isinstance(value, str) or not value:
        return value
    if value.startswith("lambada:"):
        return "lambada:" + _resolved(value.removeprefix("lambada:"), base)
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    if always or value.startswith(("./", "../")) or (base / path).exists():
        return os.path.normpath(base / path)
    return value


def _resolve_paths(table: dict[str, Any], base: Path) -> None:
    """Resolve the path-valued keys of a recipe table (or of one override) against ``base``, in place."""
    for section, key in _PATH_KEYS:
        if isinstance(table.get(section), dict) and key in table[section]:
            table[section][key] = _resolved(table[section][key], base, always=section == "output")
    sets = table.get("eval", {}).get("sets") if isinstance(table.get("eval"), dict) else None
    if isinstance(sets, list):
        table["eval"]["sets"] = [_resolved(v, base) for v in sets]


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate the recipe at ``path``. Errors are ValueErrors naming the file and key.

    Relative paths in the file resolve against the file's folder; in ``overrides`` (typed by the user),
    against the working directory. Without ``[output].dir`` the run is saved in ``runs/<name>`` beside
    the recipe.
    """
    path = Path(path)
    if not path.is_file():
        raise KronfactError(f"recipe {path} does not exist")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise KronfactError(f"{path}: not valid TOML ({err})") from None
    _resolve_paths(table, path.absolute().parent)
    overridden = []
    for item in overrides:
        key, update = _parse_override(item)
        overridden.append(key)
        _resolve_paths(update, Path.cwd())
        _merge(table, update)
    try:
        recipe = _build(Recipe, table, "")
        _check(recipe)
    except _Invalid as err:
        via = next((f" (from --set {k})" for k in overridden
                    if err.key.startswith(k) or k.startswith(err.key) or k in str(err)), "")
        raise KronfactError(f"{path}: {err}{via}") from None
    recipe.source = str(path.absolute())
    return recipe


def __getattr__(name: str) -> Any:
    """run_recipe and RecipeResult moved to :mod:`kronfact.run`; importable from here until the next minor release."""
    if name not in ("run_recipe", "RecipeResult"):
        raise AttributeError(f"module 'kronfact.recipe' has no attribute {name!r}")
    import warnings

    from . import run

    warnings.warn(f"kronfact.recipe.{name} moved to kronfact.run.{name}", DeprecationWarning, stacklevel=2)
    return getattr(run, name)
