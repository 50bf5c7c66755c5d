"""``kronfact compress / eval / merge / info``: model folders in, model folders and reports out.

Cheap checks (options, files, the output folder) run before any model is loaded; models load through
:func:`kronfact.from_pretrained`, which refuses any tensor it would not read from the file; outputs are
written to a temp folder beside OUT and renamed last.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.table import Table

from .. import evaluate, io, pretrained, surgery
from ..atomic import staged_dir
from ..checkpoint import PICKLE_SUFFIXES, open_checkpoint, refuse_pickle
from ..data import EVAL_SETS, calibration_batches, encode, load_dataset_text, load_tokenizer, tokenize_file
from ..errors import KronfactError
from ..evaluate import model_context
from ..kron import INITS
from .core import DebugOption, ForceOption, JsonOption, app, console, fmt_pair, natural_key, rule_list, run

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "tokenizer.model")
REPORT_JSON = "compression_report.json"


def check_output(out: Path, force: bool) -> None:
    """Refuse an output folder that exists (without ``--force``) or cannot be written — cheaply, up front."""
    if out.exists() and not force:
        raise KronfactError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise KronfactError(f"{out} exists and is not a folder; give a folder for --out")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise KronfactError(f"cannot write {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise KronfactError(f"cannot write to {parent}: permission denied")


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """A temp folder beside ``out`` to write into; renamed to ``out`` only when the block succeeds."""
    check_output(out, force)
    with staged_dir(out) as tmp:
        yield tmp


def _model_folder(path: Path) -> Path:
    """Check a model folder (or a .safetensors file with config.json beside it) before loading it."""
    if not path.exists():
        raise KronfactError(f"{path} does not exist")
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise refuse_pickle(path)
    if path.is_file() and path.suffix != ".safetensors":
        raise KronfactError(f"{path} is not a model: give a Hugging Face folder or a .safetensors file with "
                            "config.json")
    if not (folder / "config.json").is_file():
        raise KronfactError(f"{folder} has no config.json; a model needs one beside its weights")
    open_checkpoint(path)  # refuses pickles and corrupt, truncated or lying safetensors before transformers sees them
    return folder


def load_model(path: Path) -> Any:
    """A transformers model (compressed or not) from a folder or a .safetensors file with config.json beside,
    already checked by :func:`_model_folder`."""
    try:
        import transformers
    except ImportError:
        raise KronfactError("loading a model needs transformers: pip install 'kronfact[hf]'") from None
    transformers.utils.logging.disable_progress_bar()  # stderr is for errors
    return pretrained.from_pretrained(path)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _parse_shape(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[x×,]\s*(\d+)\s*", text)
    if not m:
        raise KronfactError(f"--shape-a must look like 64x32, got {text!r}")
    return int(m[1]), int(m[2])


def _calibration_batches(model_path: Path, model: Any, text: Path, windows: int, length: int) -> list[torch.Tensor]:
    """``windows`` random windows (seed 0) of ``length`` tokens (at most the model's context) from ``text``."""
    if windows < 1 or length < 2:
        raise KronfactError(f"--calibration-windows must be ≥ 1 and --calibration-len ≥ 2, got {windows} and {length}")
    ids = tokenize_file(text, load_tokenizer(model_path if model_path.is_dir() else model_path.parent))
    try:
        return calibration_batches(ids, windows, min(length, model_context(model)))
    except ValueError as e:
        raise KronfactError(f"--calibration-text {text}: {e}") from None


@app.command()
def compress(
    model: Annotated[Path, typer.Argument(help="Hugging Face model folder, or a .safetensors file with config.json.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder to write the compressed model to.")],
    rules: Annotated[str, typer.Option(help="Which modules to compress: comma-separated patterns, e.g. "
                                            "'mlp.*', 'mlp.*,!h.0.*' or 're:<regex>'.")] = "mlp.*",
    budget: Annotated[float | None, typer.Option(help="Total parameter budget of the model, e.g. 81e6.")] = None,
    ratio: Annotated[float | None, typer.Option(help="Fraction of the matched layers' parameters to keep "
                                                "(instead of --budget).")] = None,
    shape_a: Annotated[str | None, typer.Option(help="Fixed A shape for every matched layer, e.g. 64x32.")] = None,
    rank: Annotated[int | None, typer.Option(help="Fixed rank for every matched layer.")] = None,
    init: Annotated[str, typer.Option(help=" | ".join(INITS))] = "vanloan",
    calibration_text: Annotated[Path | None, typer.Option(help="Text for data-aware compression (tokenized with "
                                                          "the model's tokenizer); needed for pretrained LMs.")] = None,
    calibration_windows: Annotated[int, typer.Option(help="Random windows drawn from --calibration-text "
                                                     "(seed 0).")] = 32,
    calibration_len: Annotated[int, typer.Option(help="Tokens per calibration window (at most the model's "
                                                 "context).")] = 256,
    permute: Annotated[int, typer.Option(help="Rounds of row/column permutation search per layer (0: off).")] = 0,
    method: Annotated[str, typer.Option(help="auto (pruned neurons with --calibration-text, else Kronecker "
                                        "sums) | neurons | kron")] = "auto",
    force: ForceOption = False,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Replace the matched layers of a model by Kronecker sums or pruned MLPs and write the compressed folder."""

    def body() -> None:
        surgery.check_budget(budget, ratio)
        if method not in surgery.METHODS:
            raise KronfactError(f"--method must be one of {', '.join(surgery.METHODS)}, got {method!r}")
        if calibration_text is not None and not calibration_text.is_file():
            raise KronfactError(f"--calibration-text {calibration_text} does not exist or is not a file")
        check_output(out, force)  # before minutes of work, not after
        _model_folder(model)
        patterns, given = rule_list(rules), {"shape_a": _parse_shape(shape_a), "rank": rank, "ratio": ratio,
                                             "budget": None if budget is None else int(budget)}
        m = load_model(model)
        if calibration_text is not None:
            given["calibration"] = _calibration_batches(model, m, calibration_text, calibration_windows,
                                                        calibration_len)
        report = surgery.compress(m, rules=patterns, init=init, permute=permute, method=method, progress=not as_json,
                                  **{k: v for k, v in given.items() if v is not None})
        with staged_output(out, force) as tmp:
            pretrained.save_pretrained(m, tmp, overwrite=True)
            _copy_tokenizer(model if model.is_dir() else model.parent, tmp)
            (tmp / REPORT_JSON).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        if as_json:
            typer.echo(json.dumps({"out": str(out), **report.to_dict()}, indent=1))
            return
        console.print(report)
        console.print(f"wrote {out}")

    run(debug, body, flags={"budget": "--budget", "ratio": "--ratio", "calibration": "--calibration-text",
                             "permute": "--permute", "shape_a": "--shape-a", "rank": "--rank", "init": "--init",
                             "method": "--method", "rules": "--rules"})


@app.command(name="eval")
def eval_(
    model: Annotated[Path, typer.Argument(help="Model folder (compressed or not) with its tokenizer.")],
    text: Annotated[Path | None, typer.Option(help="UTF-8 text file to measure perplexity on.")] = None,
    dataset: Annotated[str | None, typer.Option(help="wikitext-103 | wikitext-2 | lambada (needs `datasets` "
                                                   "and the network or its cache).")] = None,
    lambada_file: Annotated[bool, typer.Option("--lambada", help="Treat --text as LAMBADA examples, one per "
                                               "line: last-word accuracy.")] = False,
    context: Annotated[int | None, typer.Option(help="Window length (default: the model's positions).")] = None,
    stride: Annotated[int | None, typer.Option(help="Sliding-window stride (default context/2).")] = None,
    protocol: Annotated[str, typer.Option(help="sliding (token-weighted) | krony (mean of window means).")]
    = "sliding",
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    tokenizer: Annotated[Path | None, typer.Option(help="Folder with the tokenizer (default: MODEL).")] = None,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Perplexity (sliding window or Krony-PT's protocol) or LAMBADA last-word accuracy."""

    def body() -> None:
        if (text is None) == (dataset is None):
            raise KronfactError("give exactly one of --text FILE or --dataset NAME")
        if dataset is not None and dataset not in EVAL_SETS:
            raise KronfactError(f"--dataset must be one of {', '.join(EVAL_SETS)}, got {dataset!r}")
        if text is not None and not text.is_file():
            raise KronfactError(f"--text {text} does not exist")
        if protocol not in evaluate.PROTOCOLS:
            raise KronfactError(f"--protocol must be one of {', '.join(evaluate.PROTOCOLS)}, got {protocol!r}")
        tok_dir = tokenizer or (model if model.is_dir() else model.parent)
        _model_folder(model)
        tok = load_tokenizer(tok_dir)
        source = dataset or str(text)
        if dataset is not None:
            data = load_dataset_text(dataset)
        elif lambada_file:
            data = [line for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            data = tokenize_file(text, tok)
        m = load_model(model)
        if isinstance(data, list):  # LAMBADA examples
            res = evaluate.lambada(m, tok, data, context=context, batch_size=batch_size, progress=not as_json)
            row = {"examples": res.count, "accuracy": res.accuracy, "perplexity": res.perplexity}
            shown = {"examples": str(res.count), "last-word accuracy": f"{res.accuracy:.2%}",
                     "last-word perplexity": f"{res.perplexity:.2f}"}
        else:
            ids = data if isinstance(data, torch.Tensor) else torch.tensor(encode(tok, data))
            ctx = context or evaluate.model_context(m)
            ppl = evaluate.perplexity(m, ids, context=ctx, stride=stride, protocol=protocol,
                                      batch_size=batch_size, progress=not as_json)
            row = {"tokens": ids.numel(), "protocol": protocol, "context": ctx,
                   "stride": ctx if protocol == "krony" else (stride or max(ctx // 2, 1)), "perplexity": ppl}
            shown = {**{k: str(v) for k, v in row.items()}, "perplexity": f"{ppl:.3f}"}
        if as_json:
            typer.echo(json.dumps({"model": str(model), "source": source, **row}, indent=1))
            return
        table = Table(title=f"{model} on {source}")
        for col in shown:
            table.add_column(col, justify="right")
        table.add_row(*shown.values())
        console.print(table)

    run(debug, body, flags={"context": "--context", "stride": "--stride", "batch_size": "--batch-size",
                             "protocol": "--protocol"})


@app.command()
def merge(
    inp: Annotated[Path, typer.Argument(metavar="IN", help="Compressed model folder.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for the merged, plain transformers model.")],
    force: ForceOption = False,
    debug: DebugOption = False,
) -> None:
    """Multiply every Kronecker sum back into a dense layer: a plain transformers checkpoint."""

    def body() -> None:
        check_output(out, force)
        _model_folder(inp)
        if not (inp / io.KRONFACT_JSON).is_file():
            raise KronfactError(f"{inp} is not a kronfact-compressed folder (no {io.KRONFACT_JSON}); nothing to merge")
        m = io.merge(load_model(inp))
        with staged_output(out, force) as tmp:
            pretrained.save_pretrained(m, tmp, overwrite=True)
            _copy_tokenizer(inp, tmp)
        console.print(f"merged {inp} → {out}")

    run(debug, body)


@app.command()
def info(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Compressed model folder.")],
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """What is compressed in a folder: layers, structures, ranks, parameters, errors (checked against the weights)."""

    def body() -> None:
        if not folder.is_dir():
            raise KronfactError(f"{folder} does not exist or is not a folder")
        if not (folder / io.KRONFACT_JSON).is_file():
            raise KronfactError(f"{folder} is not a kronfact-compressed folder (no {io.KRONFACT_JSON})")
        params = pretrained.verify_folder(folder)
        total = sum(math.prod(t.shape) for t in open_checkpoint(folder).tensors.values())
        errors = {}
        if (folder / REPORT_JSON).is_file():
            errors = _report_errors(json.loads((folder / REPORT_JSON).read_text(encoding="utf-8")))
        rows = []
        for e in sorted(params, key=lambda e: natural_key(e.name)):
            kron = e.kind == "kron"
            rows.append({"name": e.name, "kind": e.kind, "out_features": e.out_features, "in_features": e.in_features,
                         "shape_a": list(e.shape_a) if kron else None,
                         "shape_b": [e.out_features // e.shape_a[0], e.in_features // e.shape_a[1]] if kron else None,
                         "rank": e.rank if kron else None, "params": params[e],
                         "dense_params": e.out_features * e.in_features + e.bias * e.out_features if kron else None,
                         "rel_error": errors.get(e.name)})
        # A pruned layer's size before pruning is not recorded, so the dense total needs every layer to be kron.
        dense = (total + sum(r["dense_params"] - r["params"] for r in rows)
                 if all(r["kind"] == "kron" for r in rows) else None)
        if as_json:
            typer.echo(json.dumps({"folder": str(folder), "parameters": total, "dense_parameters": dense,
                                   "modules": rows}, indent=1))
            return
        table = Table(title=f"{folder}: {len(rows)} compressed layers")
        table.add_column("module", no_wrap=True, min_width=min(max(len(r["name"]) for r in rows), 48))
        for col in ("out×in", "structure", "rank", "params", "kept", "rel. error"):
            table.add_column(col, justify="right")
        for r in rows:
            kron = r["kind"] == "kron"
            table.add_row(r["name"], f"{r['out_features']}×{r['in_features']}",
                          fmt_pair(r["shape_a"], r["shape_b"]) if kron else "pruned (dense)",
                          str(r["rank"]) if kron else "—", f"{r['params']:,}",
                          f"{r['params'] / r['dense_params']:.1%}" if kron else "—",
                          "—" if r["rel_error"] is None else f"{r['rel_error']:.4f}")
        console.print(table)
        console.print(f"parameters: {total:,} in model.safetensors (every tensor, tied ones once)"
                      + (f"; {dense:,} with the Kronecker layers dense ({total / dense:.1%} kept)" if dense else ""))

    run(debug, body)


def _report_errors(report: Any) -> dict[str, float]:
    """module name → relative error, from a saved compression report (layers listed with name and rel_error)."""
    layers = report.get("layers", []) if isinstance(report, dict) else []
    return {row["name"]: float(row["rel_error"]) for row in layers
            if isinstance(row, dict) and "name" in row and isinstance(row.get("rel_error"), (int, float))}
