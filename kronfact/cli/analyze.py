"""``kronfact analyze``: stream a checkpoint tensor by tensor (one tensor in memory at a time) and
print, for each selected 2-D weight, the Van Loan error of Kronecker sums over candidate factor
shapes (:mod:`kronfact.analyze`), as tables, a JSON file and a plot."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..analyze import PLOT_FRACTIONS, LayerAnalysis, analyze_shapes, analyze_weight, load_weight, release_freed_memory
from ..atomic import staged_file
from ..checkpoint import FLOAT_DTYPES, Checkpoint, TensorInfo, open_checkpoint
from ..errors import KronfactError
from ..progress import progress_bar
from ..rules import parse_rules
from .core import DebugOption, app, console, fmt_pair, fmt_shape, natural_key, rule_list, run

# Default selection leaves these out: token/position tables and output embeddings.
EMBEDDING = re.compile(r"embed|(^|\.)(wte|wpe|lm_head|shared)\.", re.I)


def _matcher(rules: str | None) -> Callable[[str], bool] | None:
    """``--rules`` as a predicate on module names (:func:`kronfact.rules.parse_rules` semantics)."""
    patterns = rule_list(rules)
    if patterns is None:
        return None
    try:
        parsed = parse_rules(patterns)
    except ValueError as err:
        raise KronfactError(f"--rules: {err}") from None
    include = [r for r in parsed if not r.exclude]
    exclude = [r for r in parsed if r.exclude]
    return lambda name: any(r.matches(name) for r in include) and not any(r.matches(name) for r in exclude)


def select_weights(ckpt: Checkpoint, rules: str | None) -> list[TensorInfo]:
    """The 2-D floating weights to analyze: those whose module matches ``rules``, else every non-embedding."""
    matrices = [t for t in ckpt.tensors.values() if len(t.shape) == 2 and t.dtype in FLOAT_DTYPES]
    if not matrices:
        raise KronfactError("the checkpoint holds no 2-D floating-point weight to analyze")
    match = _matcher(rules)
    if match is None:
        chosen = [t for t in matrices if not EMBEDDING.search(t.name)]
    else:
        chosen = [t for t in matrices if match(t.name.removesuffix(".weight"))]
    if not chosen:
        examples = ", ".join(sorted((t.name for t in matrices), key=natural_key)[:5])
        what = f"--rules {rules!r} match" if rules else "the default selection (non-embedding) matches"
        raise KronfactError(f"{what} no 2-D weight; module names look like: {examples}")
    return chosen


def _parse_list(text: str | None, kind: type, what: str) -> list:
    if text is None:
        return []
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise KronfactError(f"{what} must be a comma-separated list of {kind.__name__}s, got {text!r}") from None
    return values


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
                     [fmt_pair(best["shape_a"], best["shape_b"]), str(best["rank"]), f"{best['params']:,}",
                      f"{best['rel_error']:.3f}"])
            table.add_row(layer.name if i == 0 else "", fmt_shape(layer.shape) if i == 0 else "", f"{f:.0%}",
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
            table.add_row(layer.name if i == 0 else "", fmt_pair(a, b), *cells,
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
    with staged_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _check_writable_file(path: Path | None, option: str) -> None:
    if path is None:
        return
    if path.is_dir():
        raise KronfactError(f"{option} {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise KronfactError(f"{option} {path}: directory {path.parent} does not exist")


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
            raise KronfactError(f"--ranks must be positive, got {ranks}")
        if any(not 0 < f <= 1 for f in fraction_list):
            raise KronfactError(f"--fractions must lie in (0, 1], got {fractions}")
        if grid < 0 or grid == 1 or max_side < 1:
            raise KronfactError("--grid must be 0 or ≥ 2, and --max-side ≥ 1")
        _check_writable_file(json_out, "--json")
        _check_writable_file(plot, "--plot")
        if plot is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise KronfactError("--plot needs matplotlib: pip install 'kronfact[plot]'") from None

        ckpt_ = open_checkpoint(ckpt)
        selected = select_weights(ckpt_, rules)
        conv1d = ckpt_.conv1d
        orientation = "GPT-2 Conv1D weights transposed to (out, in)" if conv1d else "weights read as (out, in)"
        console.print(f"{ckpt}: {len(ckpt_.tensors)} tensors, {len(selected)} selected; {orientation}")

        layers = []
        release_freed_memory()
        with progress_bar(True, len(selected), "analyzing", unit="tensors") as advance:
            for info in sorted(selected, key=lambda t: (t.file, t.offset)):  # sequential reads, shard by shard
                weight = load_weight(info, conv1d)
                try:
                    shapes = analyze_shapes(*weight.shape, grid, max_side)
                    layers.append(analyze_weight(info.name.removesuffix(".weight"), weight, rank_list,
                                                 fraction_list, shapes))
                except ValueError as err:
                    raise KronfactError(f"{info.name}: {err}") from None
                del weight  # with it goes its file mapping: resident memory stays at one tensor
                advance(1)
        layers.sort(key=lambda layer: natural_key(layer.name))
        if fraction_list:
            console.print(_fraction_table(layers, fraction_list))
        if rank_list:
            console.print(_rank_table(layers, rank_list))
        if json_out is not None:
            rows = [row for layer in layers for row in layer.rows]
            with staged_file(json_out) as tmp:
                tmp.write_text(json.dumps(rows, indent=1) + "\n")
            console.print(f"wrote {len(rows)} rows to {json_out}")
        if plot is not None:
            _write_plot(plot, layers)
            console.print(f"wrote {plot}")

    run(debug, body)
