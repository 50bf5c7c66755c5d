"""Shipped recipes, run as shipped: the compressed model before and after recovery training.

Runs each recipe end to end (``kronfact.run.run_recipe``: compress → evaluate → recover → evaluate)
and writes the ``recipes`` section of RESULTS.md: parameters, the evaluation sets before and after
training, the held-out validation loss at step 0 and the one kept, tokens and wall time.

    python benchmarks/recipe_results.py recipes/shakespeare-tiny.toml
    python benchmarks/recipe_results.py recipes/smollm2-135m.toml --model /path/to/smollm2   # ≈ 15 min
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, write_section  # noqa: E402

from kronfact.run import run_recipe  # noqa: E402


def row(result, seconds: float) -> list[str]:
    t = result.train
    cells = []
    for name, after in result.evals.items():
        before = result.evals_before_training.get(name, {})
        key = "perplexity" if "perplexity" in after else next(iter(after))
        cells.append(f"{Path(name).name} {key} {before.get(key, float('nan')):.2f} → {after[key]:.2f}")
    val = "—" if t is None or t.initial_val is None else (
        f"{t.initial_val:.4f} → {t.best_val:.4f} (step {t.best_step} of {t.steps})")
    tokens = "—" if t is None else f"{t.tokens:,}"
    return [result.recipe.name, f"{result.params:,}", "; ".join(cells), val, tokens, f"{seconds:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", type=Path)
    parser.add_argument("--model", help="a local folder instead of the first recipe's hub id")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows = []
    for recipe in args.recipes:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            result = run_recipe(recipe, args.model, [f"output.dir={out}", "train.progress=false"])
        rows.append(row(result, time.perf_counter() - start))
        print(json.dumps(rows[-1]), flush=True)
    load = os.getloadavg()[0]
    text = "\n".join([
        "## recipes: shipped recipes run as shipped, before and after recovery",
        "",
        f"`python benchmarks/recipe_results.py {' '.join(str(r) for r in args.recipes)}"
        + (f" --model {args.model}" if args.model else "") + "`",
        "",
        f"{machine()}; load average {load:.1f} at the end (other jobs shared the cores). Seeds as in each recipe "
        "(0). Evaluation sets: the recipe's [eval] (Shakespeare val.txt: the test text, never used to select); "
        "validation: the recipe's held-out data (the tail of train.txt with `holdout`), loss at step 0 → the "
        "weights kept (the best on validation, the untrained ones included).",
        "",
        "| recipe | params | eval before → after training | validation loss (held out) | tokens | seconds |",
        "|---|---|---|---|---|---|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ])
    print(text)
    if not args.no_write:
        write_section("recipes", text)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
