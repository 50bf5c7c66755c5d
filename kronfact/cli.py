"""The ``kronfact`` command: analyze / compress / eval / merge / info.

Every command turns bad input (a missing path, a pickle, a corrupt or lying safetensors file, rules
that match nothing, an existing OUT, a failed write) into exit code 2 and one line on stderr;
``--debug`` shows the traceback instead. Outputs are written to a temp file or folder next to the
target and renamed last, so a failure never leaves a half-written OUT.

``analyze`` streams a checkpoint tensor by tensor (one tensor in memory at a time) and, for each
selected 2-D weight, measures the Van Loan error of Kronecker sums over a set of candidate factor
shapes (see :func:`analyze_shapes`).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from .atomic import staged_dir, staged_file
from .kron import FactorShape, factor_shapes, kron_spectrum, max_rank, spectrum_errors

app = typer.Typer(name="kronfact", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Compress neural networks by replacing linear layers with sums of Kronecker products.")
# On a terminal, its width; piped or redirected, wide enough that tables keep names and numbers whole.
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# safetensors dtype → bytes per element; the floating ones can be analyzed
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
# Model types whose checkpoints store transformers' Conv1D weights (in, out), and those modules' names.
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
CONV1D_TENSOR = re.compile(r"(^|\.)(c_attn|c_proj|c_fc|q_attn)\.weight$")
# Default selection leaves these out: token/position tables and output embeddings.
EMBEDDING = re.compile(r"embed|(^|\.)(wte|wpe|lm_head|shared)\.", re.I)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "tokenizer.model")
REPORT_JSON = "compression_report.json"


class CliError(Exception):
    """Bad input or a failed write: reported as one line on stderr, exit code 2."""


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"kronfact {__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    threads: Annotated[int | None, typer.Option(
        "--threads", min=1, help="CPU threads torch may use (default: OMP_NUM_THREADS, else one per core). "
        "On a machine shared with other jobs, fewer threads avoid oversubscription.")] = None,
) -> None:
    """Compress neural networks by replacing linear layers with sums of Kronecker products."""
    if threads is not None:
        torch.set_num_threads(threads)


DebugOption = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")]


def _run(debug: bool, body: Callable[[], None]) -> None:
    """Run a command's body; bad input → one line on stderr and exit code 2 (traceback with --debug)."""
    from .evaluate import DatasetUnavailableError

    try:
        body()
    except (CliError, ValueError, OSError, DatasetUnavailableError) as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, OSError) and err.filename:
            message = f"{err.filename}: {err.strerror or message}"
        typer.echo(f"kronfact: error: {message}", err=True)
        raise typer.Exit(2) from None
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as err:
        if debug:
            raise
        typer.echo(f"kronfact: internal error: {type(err).__name__}: {err} (rerun with --debug for the "
                   "traceback)", err=True)
        raise typer.Exit(1) from None


# ------------------------------------------------------------------------------------------ checkpoints


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


def _refuse_pickle(path: Path) -> CliError:
    return CliError(f"{path} is a pickle checkpoint; kronfact never unpickles files (loading one can run "
                    "arbitrary code). Convert it to safetensors with a tool you trust, e.g. transformers' "
                    "model.save_pretrained(DIR, safe_serialization=True), then pass the .safetensors file or folder")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without trusting it.

    Checks the header length against the file size, that the header is a JSON object of well-formed
    entries, that every tensor's byte span matches its dtype and shape, lies inside the file and
    overlaps no other — before any tensor is read.
    """
    size = path.stat().st_size
    if size < 8:
        raise CliError(f"{path} is not a safetensors file: {size} bytes, too short for a header")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise CliError(f"{path} is truncated or not a safetensors file: its first 8 bytes give a "
                           f"{n}-byte header, but the file has {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CliError(f"{path} is corrupt: its header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CliError(f"{path} is corrupt: its header is not a JSON object")
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
            raise CliError(f"{path} is corrupt: malformed header entry for {name!r}: {str(entry)[:120]}")
        if dtype in DTYPE_BYTES and end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CliError(f"{path}: the header lies: {name} is {dtype} {tuple(shape)} "
                           f"({math.prod(shape) * DTYPE_BYTES[dtype]} bytes) but its offsets span {end - begin} bytes")
        if end > data_size:
            raise CliError(f"{path} is truncated or its header lies: {name} ends at byte {8 + n + end}, past the "
                           f"end of the file ({size} bytes); re-download or re-save it")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, begin)
        spans.append((begin, end, name))
    reach, last = 0, ""  # the furthest end so far, and whose
    for begin, end, name in sorted(spans):
        if begin < reach and begin < end:
            raise CliError(f"{path}: the header lies: tensors {last} and {name} overlap in the file")
        if end > reach:
            reach, last = end, name
    return tensors


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CliError(f"{path} is not valid JSON ({err})") from None
    return config if isinstance(config, dict) else {}


def _read_index(path: Path) -> dict[str, TensorInfo]:
    """The tensors of a sharded checkpoint, each shard's header validated, the index checked against them."""
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
        raise CliError(f"{path} is not a valid safetensors index (a JSON object with a 'weight_map' of "
                       "tensor name → shard file)") from None
    headers = {}
    for shard in sorted(set(weight_map.values())):
        file = path.parent / shard
        if not file.is_file():
            raise CliError(f"{path} lists shard {shard}, which does not exist in {path.parent}")
        headers[shard] = read_header(file)
    tensors = {}
    for name, shard in weight_map.items():
        if name not in headers[shard]:
            raise CliError(f"{path} says {name} is in {shard}, but that shard has no such tensor")
        tensors[name] = headers[shard][name]
    return tensors


def open_checkpoint(path: Path) -> Checkpoint:
    """A .safetensors file, a ``*.safetensors.index.json`` or a folder holding either (config.json beside)."""
    if not path.exists():
        raise CliError(f"{path} does not exist")
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        files = sorted(path.glob("*.safetensors"))
        if len(indexes) > 1:
            raise CliError(f"{path} holds several indexes ({', '.join(p.name for p in indexes)}); pass one of them")
        if indexes:
            return Checkpoint(_read_index(indexes[0]), _read_config(path))
        if files:
            tensors: dict[str, TensorInfo] = {}
            for file in files:
                for name, info in read_header(file).items():
                    if name in tensors:
                        raise CliError(f"{name} is in both {tensors[name].file.name} and {file.name} in {path}")
                    tensors[name] = info
            return Checkpoint(tensors, _read_config(path))
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise _refuse_pickle(pickles[0])
        raise CliError(f"{path} holds no .safetensors checkpoint")
    if path.name.endswith(".safetensors.index.json"):
        return Checkpoint(_read_index(path), _read_config(path.parent))
    if path.suffix == ".safetensors":
        return Checkpoint(read_header(path), _read_config(path.parent))
    if path.suffix in PICKLE_SUFFIXES:
        raise _refuse_pickle(path)
    raise CliError(f"{path} is not a checkpoint kronfact reads: give a .safetensors file, a "
                   "*.safetensors.index.json or a model folder")


def rule_list(text: str | None) -> list[str] | None:
    """``--rules`` text → patterns of :mod:`kronfact.rules`, split at commas outside brackets, so
    "mlp.*,!h.0.*" is two patterns and "re:h\\.\\d{1,2}\\.mlp" one (a regex's commas sit in braces)."""
    if text is None:
        return None
    patterns, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += ch in "([{"
        depth -= ch in ")]}" and depth > 0
        if ch == "," and depth == 0:
            if text[start:i].strip():
                patterns.append(text[start:i].strip())
            start = i + 1
    if not patterns:
        raise CliError("--rules is empty; give one or more module-name patterns such as 'mlp.*'")
    return patterns


def _matcher(rules: str | None) -> Callable[[str], bool] | None:
    """``--rules`` as a predicate on module names (:func:`kronfact.rules.parse_rules` semantics)."""
    patterns = rule_list(rules)
    if patterns is None:
        return None
    from .rules import parse_rules

    try:
        parsed = parse_rules(patterns)
    except ValueError as err:
        raise CliError(f"--rules: {err}") from None
    include = [r for r in parsed if not r.exclude]
    exclude = [r for r in parsed if r.exclude]
    return lambda name: any(r.matches(name) for r in include) and not any(r.matches(name) for r in exclude)


def select_weights(ckpt: Checkpoint, rules: str | None) -> list[TensorInfo]:
    """The 2-D floating weights to analyze: those whose module matches ``rules``, else every non-embedding."""
    matrices = [t for t in ckpt.tensors.values() if len(t.shape) == 2 and t.dtype in FLOAT_DTYPES]
    if not matrices:
        raise CliError("the checkpoint holds no 2-D floating-point weight to analyze")
    match = _matcher(rules)
    if match is None:
        chosen = [t for t in matrices if not EMBEDDING.search(t.name)]
    else:
        chosen = [t for t in matrices if match(t.name.removesuffix(".weight"))]
    if not chosen:
        examples = ", ".join(sorted((t.name for t in matrices), key=_natural)[:5])
        what = f"--rules {rules!r} match" if rules else "the default selection (non-embedding) matches"
        raise CliError(f"{what} no 2-D weight; module names look like: {examples}")
    return chosen


def _natural(name: str) -> list[Any]:
    return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------------------------- analysis


def _log_spread(values: list[int], k: int) -> list[int]:
    """``k`` of the sorted ``values`` closest to a geometric grid from the first to the last (both kept)."""
    lo, hi = math.log(values[0]), math.log(values[-1])
    return sorted({min(values, key=lambda v: abs(math.log(v) - lo - (hi - lo) * i / max(k - 1, 1)))
                   for i in range(k)})


def analyze_shapes(out_features: int, in_features: int, grid: int = 4, max_side: int = 1024) -> list[FactorShape]:
    """The factor shapes ``analyze`` measures for an (out, in) weight: a cheap grid, not all of them.

    m1 takes ``grid`` divisors of out_features spread geometrically from 1 to out_features, n1 the
    same for in_features, and every pair (m1, n1) is a candidate A shape — so the corners are there:
    A (out, 1) ⊗ B (1, in) is plain low rank, A (1, n) or B (m, 1) split only one side. Left out:
    a scalar factor (A or B 1×1), A (1, in) (the same spectrum as A (out, 1)), and shapes whose
    rearranged matrix (m1·n1) × (m2·n2) has a short side above ``max_side`` (one spectrum costs
    O(out·in·short side)). ``grid=0`` keeps every shape within ``max_side``. On the trained layers of
    ../shared/models/tiny-gpt2-shakespeare the best grid-4 shape per kept fraction is within 0.001
    (mean) of the best of all 100–400 shapes.
    """
    every = factor_shapes(out_features, in_features)
    ms, ns = sorted({s.shape_a[0] for s in every}), sorted({s.shape_a[1] for s in every})
    if grid:
        ms, ns = _log_spread(ms, grid), _log_spread(ns, grid)
    shapes = {(m1, n1) for m1 in ms for n1 in ns} - {(1, 1), (out_features, in_features), (1, in_features)}
    return [s for s in every if s.shape_a in shapes
            and min(s.shape_a[0] * s.shape_a[1], s.shape_b[0] * s.shape_b[1]) <= max_side]


PLOT_FRACTIONS = [round(0.01 * 1.2**k, 4) for k in range(26)]  # 1% … ~95% of a layer's parameters


@dataclass
class LayerAnalysis:
    """Errors of every candidate shape for one weight (nn.Linear orientation (out, in))."""

    name: str
    shape: tuple[int, int]
    rows: list[dict[str, Any]]  # {name, shape, shape_a, shape_b, rank, params, rel_error[, fraction, best]}
    curve: list[float]  # best relative error at each of PLOT_FRACTIONS (nan where no candidate fits)


def _row(name: str, shape: tuple[int, int], s: FactorShape, rank: int, errors: list[float], **extra: Any) -> dict:
    return {"name": name, "shape": list(shape), "shape_a": list(s.shape_a), "shape_b": list(s.shape_b),
            "rank": rank, "params": rank * s.params_per_term, "rel_error": errors[rank], **extra}


def analyze_weight(name: str, weight: torch.Tensor, ranks: list[int], fractions: list[float],
                   shapes: list[FactorShape]) -> LayerAnalysis:
    """Relative Frobenius error of the best rank-r Kronecker sum for each shape, rank and kept fraction.

    ``weight`` is (out, in); a kept fraction f allows rank ⌊f·out·in / (m1·n1 + m2·n2)⌋ (capped at
    the shape's maximum rank), and the best shape per fraction is the fitting one of least error.
    """
    shape = (weight.shape[0], weight.shape[1])
    n = shape[0] * shape[1]
    rows: list[dict[str, Any]] = []
    by_fraction: dict[float, list[dict[str, Any]]] = {f: [] for f in fractions}
    curve = [math.inf] * len(PLOT_FRACTIONS)
    for s in shapes:
        errs = spectrum_errors(kron_spectrum(weight, s.shape_a))
        norm = float(errs[0])
        errors = [float(e) / norm if norm > 0 else 0.0 for e in errs]
        top = max_rank(s.shape_a, s.shape_b)
        rows += [_row(name, shape, s, r, errors) for r in ranks if r <= top]
        for f in fractions:
            r = min(int(f * n // s.params_per_term), top)
            if r >= 1:
                by_fraction[f].append(_row(name, shape, s, r, errors, fraction=f, best=False))
        for i, f in enumerate(PLOT_FRACTIONS):
            r = min(int(f * n // s.params_per_term), top)
            if r >= 1:
                curve[i] = min(curve[i], errors[r])
    for candidates in by_fraction.values():
        if candidates:
            min(candidates, key=lambda row: (row["rel_error"], row["params"]))["best"] = True
        rows += candidates
    return LayerAnalysis(name, shape, rows, [c if c < math.inf else math.nan for c in curve])


def _load_weight(info: TensorInfo, conv1d: bool) -> torch.Tensor:
    """One tensor as float32 (float64 kept), (out, in). Opened on its own: safetensors maps the file, and
    the pages a handle has touched stay resident until it closes — one handle per shard would hold the shard."""
    from safetensors import safe_open

    try:
        with safe_open(info.file, framework="pt") as f:
            weight = f.get_tensor(info.name)
    except Exception as err:  # safetensors' errors carry no stable type across versions
        raise CliError(f"{info.file}: cannot read {info.name} ({err}); the file is corrupt") from None
    weight = weight.float() if weight.dtype != torch.float64 else weight
    return weight.T if conv1d and CONV1D_TENSOR.search(info.name) else weight


def _release_freed_memory() -> None:
    """Have glibc serve blocks ≥ 1 MB by mmap, returned to the OS when freed. Its default threshold grows
    with the blocks freed, after which freed per-layer buffers stay in the heap: RSS creeps up layer by layer."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _parse_list(text: str | None, kind: type, what: str) -> list:
    if text is None:
        return []
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"{what} must be a comma-separated list of {kind.__name__}s, got {text!r}") from None
    return values


def _fmt_shape(s: list[int] | tuple[int, ...]) -> str:
    return "×".join(str(v) for v in s)


def _fmt_pair(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> str:
    return f"{_fmt_shape(a)} ⊗ {_fmt_shape(b)}"


def _fraction_table(layers: list[LayerAnalysis], fractions: list[float]) -> Table:
    table = Table(title="Best candidate Kronecker shape per kept fraction of each layer's parameters "
                  "(Van Loan, relative Frobenius error)")
    table.add_column("layer", no_wrap=True, min_width=min(max(len(layer.name) for layer in layers), 48))
    for col in ("out×in", "keep", "A ⊗ B", "rank", "params", "rel. error"):
        table.add_column(col, justify="right")
    for layer in layers:
        for i, f in enumerate(fractions):
            best = next((r for r in layer.rows if r.get("fraction") == f and r["best"]), None)
            cells = (["—"] * 4 if best is None else
                     [_fmt_pair(best["shape_a"], best["shape_b"]), str(best["rank"]), f"{best['params']:,}",
                      f"{best['rel_error']:.3f}"])
            table.add_row(layer.name if i == 0 else "", _fmt_shape(layer.shape) if i == 0 else "", f"{f:.0%}",
                          *cells, end_section=i == len(fractions) - 1)
    return table


def _rank_table(layers: list[LayerAnalysis], ranks: list[int]) -> Table:
    table = Table(title="Relative error per candidate shape and rank (kept fraction of the layer's parameters)")
    table.add_column("layer", no_wrap=True, min_width=min(max(len(layer.name) for layer in layers), 48))
    table.add_column("A ⊗ B", justify="right")
    for r in ranks:
        table.add_column(f"rank {r}", justify="right")
    for layer in layers:
        n = layer.shape[0] * layer.shape[1]
        shapes: dict[tuple, dict[int, dict]] = {}
        for row in layer.rows:
            if "fraction" not in row:
                shapes.setdefault((tuple(row["shape_a"]), tuple(row["shape_b"])), {})[row["rank"]] = row
        for i, ((a, b), by_rank) in enumerate(shapes.items()):
            cells = [f"{by_rank[r]['rel_error']:.3f} ({by_rank[r]['params'] / n:.1%})" if r in by_rank else "—"
                     for r in ranks]
            table.add_row(layer.name if i == 0 else "", _fmt_pair(a, b), *cells,
                          end_section=i == len(shapes) - 1)
    return table


def _group(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def _write_plot(path: Path, layers: list[LayerAnalysis]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    curves: dict[str, list[list[float]]] = {}
    for layer in layers:
        curves.setdefault(layer.name if len(layers) <= 8 else _group(layer.name), []).append(layer.curve)
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, group in sorted(curves.items()):
        values = np.array(group)
        known = ~np.isnan(values)  # nan: no candidate shape fits that small a fraction
        mean = np.where(known.any(0), np.nansum(values, 0) / np.maximum(known.sum(0), 1), np.nan)
        ax.plot(PLOT_FRACTIONS, mean, marker=".",
                label=label + (f" (mean of {len(group)})" if len(group) > 1 else ""))
    ax.set(xscale="log", xlabel="kept fraction of the layer's parameters", ylabel="relative Frobenius error",
           title="Best Kronecker sum (Van Loan) per kept fraction", ylim=(0, None))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    _atomic_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _atomic_file(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temp file beside ``path``, then rename it to ``path``."""
    with staged_file(path) as tmp:
        write(str(tmp))


def _check_writable_file(path: Path | None, option: str) -> None:
    if path is None:
        return
    if path.is_dir():
        raise CliError(f"{option} {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise CliError(f"{option} {path}: directory {path.parent} does not exist")


@app.command()
def analyze(
    ckpt: Annotated[Path, typer.Argument(help=".safetensors file, *.safetensors.index.json, or model folder.")],
    rules: Annotated[str | None, typer.Option(help="Comma-separated module-name patterns, e.g. 'mlp.*' or "
                                                 "'mlp.*,!h.0.*' or 're:<regex>'. Default: every 2-D weight "
                                                 "that is not an embedding.")] = None,
    ranks: Annotated[str | None, typer.Option(help="Comma-separated ranks, e.g. '1,2,4'.")] = None,
    fractions: Annotated[str | None, typer.Option(help="Comma-separated kept fractions of each layer's "
                                                     "parameters. Default 0.1,0.25,0.5 (unless --ranks).")] = None,
    grid: Annotated[int, typer.Option(help="Divisors per side of the candidate-shape grid (0: every shape).")]
    = 4,
    max_side: Annotated[int, typer.Option(help="Largest short side of the rearranged matrix a candidate may "
                                          "have (bounds the SVD cost).")] = 1024,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every measured row as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Plot error vs kept fraction to this PNG.")] = None,
    debug: DebugOption = False,
) -> None:
    """Measure how well each weight of a checkpoint factors into Kronecker sums, streaming tensor by tensor."""

    def body() -> None:
        rank_list = _parse_list(ranks, int, "--ranks")
        fraction_list = _parse_list(fractions, float, "--fractions")
        if not rank_list and not fraction_list:
            fraction_list = [0.1, 0.25, 0.5]
        if any(r < 1 for r in rank_list):
            raise CliError(f"--ranks must be positive, got {ranks}")
        if any(not 0 < f <= 1 for f in fraction_list):
            raise CliError(f"--fractions must lie in (0, 1], got {fractions}")
        if grid < 0 or grid == 1 or max_side < 1:
            raise CliError("--grid must be 0 or ≥ 2, and --max-side ≥ 1")
        _check_writable_file(json_out, "--json")
        _check_writable_file(plot, "--plot")
        if plot is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise CliError("--plot needs matplotlib: pip install 'kronfact[plot]'") from None

        ckpt_ = open_checkpoint(ckpt)
        selected = select_weights(ckpt_, rules)
        conv1d = ckpt_.conv1d
        orientation = "GPT-2 Conv1D weights transposed to (out, in)" if conv1d else "weights read as (out, in)"
        console.print(f"{ckpt}: {len(ckpt_.tensors)} tensors, {len(selected)} selected; {orientation}")

        from .evaluate import progress_bar

        layers = []
        _release_freed_memory()
        with progress_bar(True, len(selected), "analyzing") as advance:
            for info in sorted(selected, key=lambda t: (t.file, t.offset)):  # sequential reads, shard by shard
                weight = _load_weight(info, conv1d)
                try:
                    shapes = analyze_shapes(*weight.shape, grid, max_side)
                    layers.append(analyze_weight(info.name.removesuffix(".weight"), weight, rank_list,
                                                 fraction_list, shapes))
                except ValueError as err:
                    raise CliError(f"{info.name}: {err}") from None
                del weight  # with it goes its file mapping: resident memory stays at one tensor
                advance(1)
        layers.sort(key=lambda layer: _natural(layer.name))
        if fraction_list:
            console.print(_fraction_table(layers, fraction_list))
        if rank_list:
            console.print(_rank_table(layers, rank_list))
        if json_out is not None:
            rows = [row for layer in layers for row in layer.rows]
            _atomic_file(json_out, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1) + "\n"))
            console.print(f"wrote {len(rows)} rows to {json_out}")
        if plot is not None:
            _write_plot(plot, layers)
            console.print(f"wrote {plot}")

    _run(debug, body)


# ---------------------------------------------------------------------------------------------- models


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """A temp folder beside ``out`` to write into; renamed to ``out`` only when the block succeeds."""
    if out.exists() and not force:
        raise CliError(f"{out} already exists; pass --force to replace it")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise CliError(f"cannot write {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CliError(f"cannot write to {parent}: permission denied")
    with staged_dir(out) as tmp:
        yield tmp


def _model_folder(path: Path) -> Path:
    """Check a model folder (or a .safetensors file with config.json beside it) before loading it."""
    if not path.exists():
        raise CliError(f"{path} does not exist")
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise _refuse_pickle(path)
    if path.is_file() and path.suffix != ".safetensors":
        raise CliError(f"{path} is not a model: give a Hugging Face folder or a .safetensors file with config.json")
    if not (folder / "config.json").is_file():
        raise CliError(f"{folder} has no config.json; a model needs one beside its weights")
    open_checkpoint(path)  # refuses pickles and corrupt, truncated or lying safetensors before transformers sees them
    return folder


def load_model(path: Path) -> Any:
    """A transformers model (compressed or not) from a folder or a .safetensors file with config.json beside."""
    folder = _model_folder(path)
    try:
        import transformers
    except ImportError:
        raise CliError("loading a model needs transformers: pip install 'kronfact[hf]'") from None
    from . import io

    transformers.utils.logging.disable_progress_bar()  # stderr is for errors

    if path.is_dir():
        return io.from_pretrained(folder).eval()
    from safetensors.torch import load_model as load_safetensors

    config, cls = io.model_class(folder)
    model = cls._from_config(config)
    missing, unexpected = load_safetensors(model, path, strict=False)
    if missing or unexpected:
        raise CliError(f"{path} does not fit {cls.__name__}: {len(missing)} tensors missing, {len(unexpected)} "
                       f"unexpected (e.g. {(list(missing) + list(unexpected))[0]})")
    model.tie_weights()
    return model.eval()


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _parse_shape(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[x×,]\s*(\d+)\s*", text)
    if not m:
        raise CliError(f"--shape-a must look like 64x32, got {text!r}")
    return int(m[1]), int(m[2])


def _calibration_batches(model_path: Path, model: Any, text: Path, windows: int, length: int) -> list[torch.Tensor]:
    """``windows`` random windows (seed 0) of ``length`` tokens (at most the model's context) from ``text``."""
    from .evaluate import load_tokenizer, model_context, tokenize_file
    from .train import calibration_batches

    if not text.is_file():
        raise CliError(f"--calibration-text {text} does not exist or is not a file")
    if windows < 1 or length < 2:
        raise CliError(f"--calibration-windows must be ≥ 1 and --calibration-len ≥ 2, got {windows} and {length}")
    ids = tokenize_file(text, load_tokenizer(model_path if model_path.is_dir() else model_path.parent))
    try:
        return calibration_batches(ids, windows, min(length, model_context(model)))
    except ValueError as e:
        raise CliError(f"--calibration-text {text}: {e}") from None


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
    init: Annotated[str, typer.Option(help="vanloan | prune | random")] = "vanloan",
    calibration_text: Annotated[Path | None, typer.Option(help="Text for data-aware compression (tokenized with "
                                                          "the model's tokenizer); needed for pretrained LMs.")] = None,
    calibration_windows: Annotated[int, typer.Option(help="Random windows drawn from --calibration-text "
                                                     "(seed 0).")] = 32,
    calibration_len: Annotated[int, typer.Option(help="Tokens per calibration window (at most the model's "
                                                 "context).")] = 256,
    permute: Annotated[int, typer.Option(help="Rounds of row/column permutation search per layer (0: off).")] = 0,
    force: ForceOption = False,
    debug: DebugOption = False,
) -> None:
    """Replace the matched layers of a model by Kronecker sums and write the compressed folder."""

    def body() -> None:
        if budget is not None and ratio is not None:
            raise CliError("give either --budget or --ratio, not both")
        if budget is not None and not (math.isfinite(budget) and budget >= 1):
            raise CliError(f"--budget must be a positive, finite number of parameters (e.g. 81e6), got {budget}")
        if out.exists() and not force:
            raise CliError(f"{out} already exists; pass --force to replace it")
        m = load_model(model)
        from . import io, surgery

        given = {"budget": None if budget is None else int(budget), "ratio": ratio,
                 "shape_a": _parse_shape(shape_a), "rank": rank}
        if calibration_text is not None:
            given["calibration"] = _calibration_batches(model, m, calibration_text, calibration_windows,
                                                                calibration_len)
        report = surgery.compress(m, rules=rule_list(rules), init=init, permute=permute,
                                  **{k: v for k, v in given.items() if v is not None})
        with staged_output(out, force) as tmp:
            io.save_pretrained(m, tmp, overwrite=True)
            _copy_tokenizer(model if model.is_dir() else model.parent, tmp)
            (tmp / REPORT_JSON).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        console.print(report)
        console.print(f"wrote {out}")

    _run(debug, body)


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
    debug: DebugOption = False,
) -> None:
    """Perplexity (sliding window or Krony-PT's protocol) or LAMBADA last-word accuracy."""

    def body() -> None:
        from . import evaluate

        if (text is None) == (dataset is None):
            raise CliError("give exactly one of --text FILE or --dataset NAME")
        if dataset is not None and dataset not in evaluate.DATASETS:
            raise CliError(f"--dataset must be one of {', '.join(evaluate.DATASETS)}, got {dataset!r}")
        if text is not None and not text.is_file():
            raise CliError(f"--text {text} does not exist")
        if protocol not in evaluate.PROTOCOLS:
            raise CliError(f"--protocol must be one of {', '.join(evaluate.PROTOCOLS)}, got {protocol!r}")
        tok_dir = tokenizer or (model if model.is_dir() else model.parent)
        _model_folder(model)
        tok = evaluate.load_tokenizer(tok_dir)
        source = dataset or str(text)
        if dataset is not None:
            data = evaluate.load_dataset_text(dataset)
        elif lambada_file:
            data = [line for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            data = evaluate.tokenize_file(text, tok)
        m = load_model(model)
        table = Table(title=f"{model} on {source}")
        if isinstance(data, list):  # LAMBADA examples
            res = evaluate.lambada(m, tok, data, context=context, batch_size=batch_size, progress=True)
            for col in ("examples", "last-word accuracy", "last-word perplexity"):
                table.add_column(col, justify="right")
            table.add_row(str(res.count), f"{res.accuracy:.2%}", f"{res.perplexity:.2f}")
        else:
            ids = data if isinstance(data, torch.Tensor) else torch.tensor(evaluate.encode(tok, data))
            ctx = context or evaluate.model_context(m)
            ppl = evaluate.perplexity(m, ids, context=ctx, stride=stride, protocol=protocol,
                                      batch_size=batch_size, progress=True)
            stride_ = ctx if protocol == "krony" else (stride or max(ctx // 2, 1))
            for col in ("tokens", "protocol", "context", "stride", "perplexity"):
                table.add_column(col, justify="right")
            table.add_row(str(ids.numel()), protocol, str(ctx), str(stride_), f"{ppl:.3f}")
        console.print(table)

    _run(debug, body)


@app.command()
def merge(
    inp: Annotated[Path, typer.Argument(metavar="IN", help="Compressed model folder.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for the merged, plain transformers model.")],
    force: ForceOption = False,
    debug: DebugOption = False,
) -> None:
    """Multiply every Kronecker sum back into a dense layer: a plain transformers checkpoint."""

    def body() -> None:
        from . import io

        if out.exists() and not force:
            raise CliError(f"{out} already exists; pass --force to replace it")
        _model_folder(inp)
        if not (inp / io.KRONFACT_JSON).is_file():
            raise CliError(f"{inp} is not a kronfact-compressed folder (no {io.KRONFACT_JSON}); nothing to merge")
        m = io.merge(load_model(inp))
        with staged_output(out, force) as tmp:
            io.save_pretrained(m, tmp, overwrite=True)
            _copy_tokenizer(inp, tmp)
        console.print(f"merged {inp} → {out}")

    _run(debug, body)


@app.command()
def info(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Compressed model folder.")],
    debug: DebugOption = False,
) -> None:
    """What is compressed in a folder: layers, shapes, ranks, parameters, errors."""

    def body() -> None:
        from . import io

        if not folder.is_dir():
            raise CliError(f"{folder} does not exist or is not a folder")
        meta_path = folder / io.KRONFACT_JSON
        if not meta_path.is_file():
            raise CliError(f"{folder} is not a kronfact-compressed folder (no {io.KRONFACT_JSON})")
        modules = io.read_kronfact_json(meta_path)
        tensors = open_checkpoint(folder).tensors
        total = sum(math.prod(t.shape) for t in tensors.values())
        errors = {}
        if (folder / REPORT_JSON).is_file():
            errors = _report_errors(json.loads((folder / REPORT_JSON).read_text(encoding="utf-8")))
        table = Table(title=f"{folder}: {len(modules)} Kronecker layers")
        table.add_column("module", no_wrap=True, min_width=min(max(len(e.name) for e in modules), 48))
        for col in ("out×in", "A ⊗ B", "rank", "params", "kept", "rel. error"):
            table.add_column(col, justify="right")
        kron_total = dense_total = 0
        for e in sorted(modules, key=lambda e: _natural(e.name)):
            shape_b = (e.out_features // e.shape_a[0], e.in_features // e.shape_a[1])
            params = e.rank * (e.shape_a[0] * e.shape_a[1] + shape_b[0] * shape_b[1])
            dense = e.out_features * e.in_features
            kron_total, dense_total = kron_total + params, dense_total + dense
            err = errors.get(e.name)
            table.add_row(e.name, f"{e.out_features}×{e.in_features}", _fmt_pair(e.shape_a, shape_b), str(e.rank),
                          f"{params:,}", f"{params / dense:.1%}", "—" if err is None else f"{err:.4f}")
        console.print(table)
        original = total - kron_total + dense_total
        console.print(f"parameters: {total:,} in model.safetensors (every tensor, tied ones once); "
                      f"{original:,} with the Kronecker layers dense ({total / original:.1%} kept)")

    _run(debug, body)


def _report_errors(report: Any) -> dict[str, float]:
    """module name → relative error, from a saved compression report (layers listed with name and rel_error)."""
    layers = report.get("layers", []) if isinstance(report, dict) else []
    return {row["name"]: float(row["rel_error"]) for row in layers
            if isinstance(row, dict) and "name" in row and isinstance(row.get("rel_error"), (int, float))}


from .recipe import recipe_app  # noqa: E402  (recipe.py imports this module lazily, inside its commands)

app.add_typer(recipe_app, name="recipe")

if __name__ == "__main__":
    app()
