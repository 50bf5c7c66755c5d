"""``kronfact recipe run / show``: declarative recipes (:mod:`kronfact.recipe`) from the command line."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..recipe import load_recipe
from ..run import run_recipe
from .core import DebugOption, console, run

recipe_app = typer.Typer(name="recipe", no_args_is_help=True, add_completion=False,
                         help="Run declarative compression recipes (recipes/*.toml).")

SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a recipe key, e.g. --set train.tokens=2e6 or --set compress.budget=81e6 (repeatable).")]


@recipe_app.command("run")
def run_command(
    recipe: Annotated[Path, typer.Argument(help="The recipe TOML file.")],
    model: Annotated[Path | None, typer.Option(help="Local model folder to use instead of [model].name.")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Folder for the run (default: [output].dir, "
                                             "else runs/<name> beside the recipe).")] = None,
    set_: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Compress, recover and evaluate a model as a recipe says; save it under --out or [output].dir."""
    def body() -> None:
        overrides = [*(set_ or []), *([f"output.dir={out.absolute()}"] if out is not None else [])]
        result = run_recipe(recipe, model, overrides)
        console.print(result.report)
        if result.train is not None:
            t = result.train
            console.print(f"trained {t.steps} steps, {t.tokens:,} tokens in {t.wall_time:.0f} s")
            if t.initial_val is not None:
                kept = "the untrained weights" if t.best_step == 0 else f"step {t.best_step} of {t.steps}"
                console.print(f"validation loss: {t.initial_val:.4f} before training → {t.best_val:.4f} kept "
                              f"({kept}; {t.final_val:.4f} at the end)")
        before = result.evals_before_training
        columns = ["set", "metric"] + (["before training", "after training"] if before else ["value"])
        table = Table(*columns, title=f"{result.recipe.name}: {result.params:,} parameters")
        for name, metrics in result.evals.items():
            for k, v in metrics.items():
                shown = [before.get(name, {}).get(k), v] if before else [v]
                table.add_row(name, k, *(f"{x:.4f}" if isinstance(x, float) else str(x) for x in shown))
        console.print(table)
        if result.out_dir:
            console.print(f"wrote {result.out_dir}")

    run(debug, body)


@recipe_app.command("show")
def show_command(
    recipe: Annotated[Path, typer.Argument(help="The recipe TOML file.")],
    set_: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Validate a recipe (with its overrides) and print it as JSON."""
    def body() -> None:
        r = load_recipe(recipe, set_ or [])
        console.print_json(json.dumps(asdict(r), default=str))

    run(debug, body)
