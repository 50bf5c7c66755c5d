"""Running a recipe (:mod:`kronfact.recipe`): load → compress → recover → evaluate → save.

:func:`run_recipe` loads the model (a local folder through :func:`kronfact.from_pretrained`, else the
hub), compresses it (with calibration text when ``[compress] calibration`` names some), recovers it
([train]: distillation from the original, validation before the first step and the best weights
kept), evaluates it ([eval]) and saves ``model/`` and ``results.json`` under the recipe's output
folder. Under torchrun every rank compresses and trains; rank 0 alone evaluates and writes.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import pretrained, resume
from .atomic import staged_file
from .data import (
    EVAL_SETS,
    TRAIN_SETS,
    calibration_batches,
    encode,
    load_dataset_text,
    load_tokenizer,
    load_tokens,
    tokenize_file,
)
from .errors import KronfactError
from .evaluate import embedding_cosine, lambada, model_context, perplexity
from .modules import count_parameters
from .recipe import ModelSpec, Recipe, TrainSpec, load_recipe
from .surgery import compress
from .train import TrainResult
from .train import train as train_model


@dataclass
class RecipeResult:
    """What :func:`run_recipe` did: the compression report, training, evaluations, where it saved."""

    recipe: Recipe
    report: Any
    params: int
    train: TrainResult | None = None
    evals: dict[str, dict[str, float]] = field(default_factory=dict)
    evals_before_training: dict[str, dict[str, float]] = field(default_factory=dict)  # the compressed model, untrained
    out_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        train_summary = None
        if self.train is not None:
            t = self.train
            train_summary = {"steps": t.steps, "tokens": t.tokens, "initial_val": t.initial_val,
                             "best_step": t.best_step, "best_val": t.best_val, "final_val": t.final_val,
                             "wall_time": t.wall_time}
        return {"recipe": self.recipe.name, "source": self.recipe.source, "params": self.params,
                "report": self.report.to_dict() if hasattr(self.report, "to_dict") else None,
                "train": train_summary, "evals": self.evals, "evals_before_training": self.evals_before_training}


def _target_device(spec: ModelSpec) -> torch.device:
    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec.device)


def _load_model(name: str, kind: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local folder (kronfact.from_pretrained: compressed or plain) or a hub id."""
    if Path(name).is_dir():
        model = pretrained.from_pretrained(name, dtype=dtype)
        tokenizer = load_tokenizer(name) if kind != "vision" else None
        return model, tokenizer
    if Path(name).exists() or name.startswith((".", "/")):
        raise KronfactError(f"model {name!r} is not a model folder")
    import transformers

    auto = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModel
    try:
        model = auto.from_pretrained(name, dtype=dtype)
        tokenizer = None if kind == "vision" else transformers.AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise KronfactError(f"cannot load model {name!r}: it is not a local folder and the Hugging Face hub is "
                            f"unreachable or it is not cached ({str(err).splitlines()[0][:200]}); download it and "
                            "pass --model PATH") from None
    return model, tokenizer


def _eval_texts(name: str, limit: int) -> list[str]:
    """Non-empty lines (at most ``limit``) of a text file or of a dataset's test split (wikitext headings left out)."""
    if name in EVAL_SETS:
        text = load_dataset_text(name)
        text = "\n".join(text) if isinstance(text, list) else text
    elif Path(name).is_file():
        text = Path(name).read_text(encoding="utf-8")
    else:
        raise KronfactError(f"evaluation set {name!r} is neither a known dataset ({', '.join(EVAL_SETS)}) nor "
                            f"a text file")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("=")]
    return lines[:limit]


def _eval_inputs(recipe: Recipe, tokenizer: Any) -> dict[str, Any]:
    """Each [eval] set read and tokenized once (it is evaluated before and after training): lines of
    text for encoders and LAMBADA, a token-id tensor for perplexity."""
    e, inputs = recipe.eval, {}
    for name in e.sets:
        set_name, _, file = name.partition(":")
        if recipe.model.kind == "encoder":
            inputs[name] = _eval_texts(name, e.max_texts)
        elif set_name == "lambada":
            inputs[name] = (load_dataset_text("lambada") if not file else _eval_texts(file, e.max_texts))[:e.max_texts]
        else:
            ids = (torch.tensor(encode(tokenizer, load_dataset_text(name)), dtype=torch.long) if name in EVAL_SETS
                   else tokenize_file(name, tokenizer))
            inputs[name] = ids if e.max_tokens is None else ids[:e.max_tokens]
    return inputs


def _evaluate(recipe: Recipe, model: nn.Module, tokenizer: Any, original: nn.Module | None,
              inputs: dict[str, Any]) -> dict[str, dict]:
    e, results = recipe.eval, {}
    for name, data in inputs.items():
        if recipe.model.kind == "encoder":
            results[name] = {"cosine": embedding_cosine(model, original, tokenizer, data, e.batch_size)}
        elif name.partition(":")[0] == "lambada":
            r = lambada(model, tokenizer, data, context=e.context, batch_size=e.batch_size, progress=True)
            results[name] = {"accuracy": r.accuracy, "perplexity": r.perplexity, "count": r.count}
        else:
            ppl = perplexity(model, data, context=e.context, stride=e.stride, protocol=e.protocol,
                             batch_size=e.batch_size, progress=True)
            results[name] = {"perplexity": ppl, "tokens": data.numel(), "protocol": e.protocol}
    return results


def _val_tokens(spec: TrainSpec, tokenizer: Any) -> torch.Tensor | None:
    if spec.val_data is None:
        return None
    name, _, split = spec.val_data.partition(":")
    if split and not Path(spec.val_data).exists():
        return load_tokens(name, tokenizer, split=split, max_tokens=spec.config.eval_tokens)
    return load_tokens(spec.val_data, tokenizer, max_tokens=spec.config.eval_tokens)


def _save(recipe: Recipe, model: nn.Module, tokenizer: Any, result: RecipeResult) -> None:
    out = recipe.out_dir
    out.mkdir(parents=True, exist_ok=True)
    has_pretrained = hasattr(tokenizer, "save_pretrained")
    pretrained.save_pretrained(model, out / "model", tokenizer if has_pretrained else None, overwrite=True)
    if tokenizer is not None and not has_pretrained:
        tokenizer.save(str(out / "model" / "tokenizer.json"))
    with staged_file(out / "results.json") as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=1) + "\n")


def _check_resumable(recipe: Recipe) -> None:
    """A KronfactError now, not after compressing, when the run would resume a checkpoint it cannot."""
    cfg = None if recipe.train is None else recipe.train.config
    last = None if cfg is None or not cfg.resume else Path(cfg.out_dir) / "last"
    if last is not None and (last / "state.json").exists():
        now = {k: getattr(cfg, k) for k in resume.SCHEDULE_FIELDS}
        resume.check_compatible(resume.read_state(last), now, int(os.environ.get("WORLD_SIZE", "1")), last)


def run_recipe(path: str | os.PathLike, model: str | os.PathLike | None = None,
               overrides: list[str] | tuple[str, ...] = ()) -> RecipeResult:
    """Run a recipe end to end: load the model (``model`` replaces ``[model].name``), compress it,
    recover it ([train]), evaluate it ([eval]) and save it under ``[output].dir`` (``model/`` — a
    folder :func:`kronfact.from_pretrained` reads — and ``results.json``; training checkpoints in
    ``train/`` make a rerun resume). Under torchrun every rank compresses and trains; rank 0 alone
    evaluates and writes."""
    recipe = load_recipe(path, overrides)
    if model is not None:
        recipe.model.name = str(model)
    if recipe.train is not None:
        cfg = recipe.train.config
        cfg.out_dir = cfg.out_dir or str(recipe.out_dir / "train")
        cfg.objective = "hidden" if recipe.model.kind == "encoder" else cfg.objective
    _check_resumable(recipe)  # before minutes of loading and compressing
    dtype = getattr(torch, recipe.model.dtype)
    net, tokenizer = _load_model(recipe.model.name, recipe.model.kind, dtype)
    net.to(_target_device(recipe.model))
    keep_original = recipe.model.kind == "encoder" or (recipe.train is not None and recipe.train.config.distill)
    original = copy.deepcopy(net).eval() if keep_original else None

    kwargs = recipe.compress_kwargs()
    c = recipe.compress
    if c.calibration is not None:
        cap = 8 * c.calibration_windows * c.calibration_len if c.calibration in TRAIN_SETS else None
        ids = load_tokens(c.calibration, tokenizer, max_tokens=cap)
        kwargs["calibration"] = calibration_batches(ids, c.calibration_windows,
                                                    min(c.calibration_len, model_context(net)))
    report = compress(net, recipe.rules(), **kwargs)
    result = RecipeResult(recipe=recipe, report=report, params=count_parameters(net))

    main = int(os.environ.get("RANK", "0")) == 0
    inputs = _eval_inputs(recipe, tokenizer) if main else {}
    if recipe.train is not None and main:  # what recovery starts from, on the same sets
        result.evals_before_training = _evaluate(recipe, net, tokenizer, original, inputs)
    if recipe.train is not None:
        spec = recipe.train
        cfg = spec.config
        cap = spec.data_tokens or (cfg.tokens if spec.data in TRAIN_SETS else None)  # streamed: no more than used
        data = load_tokens(spec.data, tokenizer, max_tokens=cap)
        val = _val_tokens(spec, tokenizer)
        if spec.holdout:  # the tail of the training text, never trained on
            cut = len(data) - max(int(len(data) * spec.holdout), 1)
            data, val = data[:cut], data[cut:]  # train() keeps the first eval_tokens of it
        result.train = train_model(net, data, cfg, teacher=original, val_data=val)

    if not main:
        return result
    result.evals = _evaluate(recipe, net, tokenizer, original, inputs)
    result.out_dir = str(recipe.out_dir)
    _save(recipe, net, tokenizer, result)
    return result
