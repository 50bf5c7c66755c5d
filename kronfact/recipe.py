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
values parsed as TOML, bare words as strings). :func:`run_recipe` runs it: load → compress → train →
evaluate → save. ``recipe_app`` is the ``kronfact recipe`` typer sub-command.

Parameters are counted in full (every tensor once, position tables included).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import typer
from torch import nn

from .evaluate import model_context
from .train import TRAIN_DATASETS, TrainConfig, TrainResult, calibration_batches, embedding_cosine, load_tokens
from .train import train as train_model

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
    init: Literal["vanloan", "prune", "random"] | None = None
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
    init: Literal["vanloan", "prune", "random"] = "vanloan"
    method: Literal["auto", "neurons", "kron"] = "auto"
    calibration: str | None = None  # text for data-aware compression: a file, a folder of *.txt, or a dataset name
    calibration_windows: int = 32  # random windows (seed 0) of calibration_len tokens
    calibration_len: int = 256


@dataclass
class TrainSpec:
    """[train]: data plus any :class:`kronfact.train.TrainConfig` field (held in ``config``)."""

    data: str  # a text file, a folder of *.txt, or a dataset name (kronfact.train.TRAIN_DATASETS)
    val_data: str | None = None  # held-out text for validation: a file, or "dataset:split"
    data_tokens: int | None = None  # load at most this many training tokens (streamed datasets)
    distill_from_original: bool = True  # teacher = the uncompressed model (needed by distill / encoders)
    config: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class EvalSpec:
    """[eval]: causal models — perplexity on dataset names (kronfact.evaluate.DATASETS) or text files,
    LAMBADA on "lambada" (or "lambada:FILE", one example a line); encoders — mean cosine of mean-pooled
    embeddings to the uncompressed model over a text file's lines."""

    sets: list[str] = field(default_factory=list)
    protocol: Literal["sliding", "krony"] = "sliding"
    context: int | None = None
    stride: int | None = None
    batch_size: int = 8
    max_tokens: int | None = None  # per set, for quick runs
    max_texts: int = 1000  # encoders / lambada: at most this many lines


@dataclass
class OutputSpec:
    dir: str | None = None  # default: runs/<name>


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
        return Path(self.output.dir or Path("runs") / self.name)

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


class _Invalid(ValueError):
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
    if c.budget is not None and c.ratio is not None:
        raise _Invalid("compress.budget", "give compress.budget or compress.ratio, not both")
    if c.budget is not None and c.budget <= 0:
        raise _Invalid("compress.budget", f"compress.budget must be positive, got {c.budget}")
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
        raise ValueError(f"--set expects key=value (e.g. train.lr=3e-4), got {item!r}")
    for text in (value.strip(), json.dumps(value.strip())):
        try:
            return key, tomllib.loads(f"{key} = {text}")
        except tomllib.TOMLDecodeError:
            continue
    raise ValueError(f"--set {item!r}: {key!r} is not a dotted key (quote parts holding dots: "
                     'compress.layers."mlp.c_fc".rank=2)')


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate the recipe at ``path``. Errors are ValueErrors naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe {path} does not exist")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    overridden = []
    for item in overrides:
        key, update = _parse_override(item)
        overridden.append(key)
        _merge(table, update)
    try:
        recipe = _build(Recipe, table, "")
        _check(recipe)
    except _Invalid as err:
        via = next((f" (from --set {k})" for k in overridden
                    if err.key.startswith(k) or k.startswith(err.key) or k in str(err)), "")
        raise ValueError(f"{path}: {err}{via}") from None
    recipe.source = str(path)
    return recipe


# --------------------------------------------------------------------------------------------- running


@dataclass
class RecipeResult:
    """What :func:`run_recipe` did: the compression report, training, evaluations, where it saved."""

    recipe: Recipe
    report: Any
    params: int
    train: TrainResult | None = None
    evals: dict[str, dict[str, float]] = field(default_factory=dict)
    out_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        train_summary = None
        if self.train is not None:
            t = self.train
            train_summary = {"steps": t.steps, "tokens": t.tokens, "best_step": t.best_step, "best_val": t.best_val,
                             "final_val": t.final_val, "wall_time": t.wall_time}
        return {"recipe": self.recipe.name, "source": self.recipe.source, "params": self.params,
                "report": self.report.to_dict() if hasattr(self.report, "to_dict") else None,
                "train": train_summary, "evals": self.evals}


def _device(spec: ModelSpec) -> torch.device:
    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec.device)


def _load_model(name: str, kind: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local folder (kronfact.from_pretrained: compressed or plain) or a hub id."""
    from . import io
    from .evaluate import load_tokenizer

    if Path(name).is_dir():
        model = io.from_pretrained(name, dtype=dtype)
        tokenizer = load_tokenizer(name) if kind != "vision" else None
        return model, tokenizer
    if Path(name).exists() or name.startswith((".", "/")):
        raise ValueError(f"model {name!r} is not a model folder")
    import transformers

    auto = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModel
    try:
        model = auto.from_pretrained(name, dtype=dtype)
        tokenizer = None if kind == "vision" else transformers.AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise ValueError(f"cannot load model {name!r}: it is not a local folder and the Hugging Face hub is "
                         f"unreachable or it is not cached ({str(err).splitlines()[0][:200]}); download it and "
                         "pass --model PATH") from None
    return model, tokenizer


def _eval_texts(name: str, limit: int) -> list[str]:
    """Non-empty lines (at most ``limit``) of a text file or of a dataset's test split (wikitext headings left out)."""
    from .evaluate import DATASETS, load_dataset_text

    if name in DATASETS:
        text = load_dataset_text(name)
        text = "\n".join(text) if isinstance(text, list) else text
    elif Path(name).is_file():
        text = Path(name).read_text(encoding="utf-8")
    else:
        raise ValueError(f"evaluation set {name!r} is neither a known dataset ({sorted(DATASETS)}) nor a text file")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("=")]
    return lines[:limit]


def _evaluate(recipe: Recipe, model: nn.Module, tokenizer: Any, original: nn.Module | None) -> dict[str, dict]:
    from .evaluate import DATASETS, lambada, load_dataset_text, perplexity, tokenize_file

    e, results = recipe.eval, {}
    for name in e.sets:
        if recipe.model.kind == "encoder":
            texts = _eval_texts(name, e.max_texts)
            results[name] = {"cosine": embedding_cosine(model, original, tokenizer, texts, e.batch_size)}
            continue
        set_name, _, file = name.partition(":")
        if set_name == "lambada":
            texts = load_dataset_text("lambada") if not file else _eval_texts(file, e.max_texts)
            r = lambada(model, tokenizer, texts[:e.max_texts], context=e.context, batch_size=e.batch_size,
                        progress=True)
            results[name] = {"accuracy": r.accuracy, "perplexity": r.perplexity, "count": r.count}
            continue
        if name in DATASETS:
            from .evaluate import encode

            ids = torch.tensor(encode(tokenizer, load_dataset_text(name)), dtype=torch.long)
        else:
            ids = tokenize_file(name, tokenizer)
        ids = ids if e.max_tokens is None else ids[:e.max_tokens]
        ppl = perplexity(model, ids, context=e.context, stride=e.stride, protocol=e.protocol,
                         batch_size=e.batch_size, progress=True)
        results[name] = {"perplexity": ppl, "tokens": ids.numel(), "protocol": e.protocol}
    return results


def _val_tokens(spec: TrainSpec, tokenizer: Any) -> torch.Tensor | None:
    if spec.val_data is None:
        return None
    name, _, split = spec.val_data.partition(":")
    if split and not Path(spec.val_data).exists():
        return load_tokens(name, tokenizer, split=split, max_tokens=spec.config.eval_tokens)
    return load_tokens(spec.val_data, tokenizer, max_tokens=spec.config.eval_tokens)


def _save(recipe: Recipe, model: nn.Module, tokenizer: Any, result: RecipeResult) -> None:
    from . import io

    out = recipe.out_dir
    out.mkdir(parents=True, exist_ok=True)
    has_pretrained = hasattr(tokenizer, "save_pretrained")
    io.save_pretrained(model, out / "model", tokenizer if has_pretrained else None, overwrite=True)
    if tokenizer is not None and not has_pretrained:
        tokenizer.save(str(out / "model" / "tokenizer.json"))
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    os.replace(tmp, out / "results.json")


def run_recipe(path: str | os.PathLike, model: str | os.PathLike | None = None,
               overrides: list[str] | tuple[str, ...] = ()) -> RecipeResult:
    """Run a recipe end to end: load the model (``model`` replaces ``[model].name``), compress it,
    recover it ([train]), evaluate it ([eval]) and save it under ``[output].dir`` (``model/`` — a
    folder :func:`kronfact.from_pretrained` reads — and ``results.json``; training checkpoints in
    ``train/`` make a rerun resume). Under torchrun every rank compresses and trains; rank 0 alone
    evaluates and writes."""
    recipe = load_recipe(path, overrides)
    from .modules import count_parameters
    from .surgery import compress

    if model is not None:
        recipe.model.name = str(model)
    dtype = getattr(torch, recipe.model.dtype)
    net, tokenizer = _load_model(recipe.model.name, recipe.model.kind, dtype)
    net.to(_device(recipe.model))
    keep_original = recipe.model.kind == "encoder" or (recipe.train is not None and recipe.train.config.distill)
    original = copy.deepcopy(net).eval() if keep_original else None

    kwargs = recipe.compress_kwargs()
    c = recipe.compress
    if c.calibration is not None:
        cap = 8 * c.calibration_windows * c.calibration_len if c.calibration in TRAIN_DATASETS else None
        ids = load_tokens(c.calibration, tokenizer, max_tokens=cap)
        kwargs["calibration"] = calibration_batches(ids, c.calibration_windows,
                                                    min(c.calibration_len, model_context(net)))
    report = compress(net, recipe.rules(), **kwargs)
    result = RecipeResult(recipe=recipe, report=report, params=count_parameters(net))

    if recipe.train is not None:
        spec = recipe.train
        cfg = spec.config
        if cfg.out_dir is None:
            cfg.out_dir = str(recipe.out_dir / "train")
        if recipe.model.kind == "encoder":
            cfg.objective = "hidden"
        cap = spec.data_tokens or (cfg.tokens if spec.data in TRAIN_DATASETS else None)  # streamed: no more than used
        data = load_tokens(spec.data, tokenizer, max_tokens=cap)
        result.train = train_model(net, data, cfg, teacher=original, val_data=_val_tokens(spec, tokenizer))

    if int(os.environ.get("RANK", "0")) != 0:
        return result
    result.evals = _evaluate(recipe, net, tokenizer, original)
    result.out_dir = str(recipe.out_dir)
    _save(recipe, net, tokenizer, result)
    return result


# ------------------------------------------------------------------------------------------------- CLI

recipe_app = typer.Typer(name="recipe", no_args_is_help=True, add_completion=False,
                         help="Run declarative compression recipes (recipes/*.toml).")

SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a recipe key, e.g. --set train.tokens=2e6 or --set compress.budget=81e6 (repeatable).")]


@recipe_app.command("run")
def run_command(
    recipe: Annotated[Path, typer.Argument(help="The recipe TOML file.")],
    model: Annotated[Path | None, typer.Option(help="Local model folder to use instead of [model].name.")] = None,
    set_: SetOption = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False,
) -> None:
    """Compress, recover and evaluate a model as a recipe says; save it under [output].dir."""
    from rich.table import Table

    from .cli import _run, console

    def body() -> None:
        result = run_recipe(recipe, model, set_ or [])
        console.print(result.report)
        if result.train is not None:
            t = result.train
            console.print(f"trained {t.steps} steps, {t.tokens:,} tokens in {t.wall_time:.0f} s; best validation "
                          f"{t.best_val} at step {t.best_step}")
        table = Table("set", "metric", "value", title=f"{result.recipe.name}: {result.params:,} parameters")
        for name, metrics in result.evals.items():
            for k, v in metrics.items():
                table.add_row(name, k, f"{v:.4f}" if isinstance(v, float) else str(v))
        console.print(table)
        if result.out_dir:
            console.print(f"wrote {result.out_dir}")

    _run(debug, body)


@recipe_app.command("show")
def show_command(
    recipe: Annotated[Path, typer.Argument(help="The recipe TOML file.")],
    set_: SetOption = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False,
) -> None:
    """Validate a recipe (with its overrides) and print it as JSON."""
    from .cli import _run, console

    def body() -> None:
        r = load_recipe(recipe, set_ or [])
        console.print_json(json.dumps(asdict(r), default=str))

    _run(debug, body)
