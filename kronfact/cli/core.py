"""The ``kronfact`` application: the typer app, its console, global options and error handling.

Every command runs its body through :func:`run`: bad input (a :class:`~kronfact.errors.KronfactError`,
an ``OSError``, a dataset the hub cannot serve) becomes one line on stderr and exit code 2; anything
else is a bug: exit code 1 with a pointer to ``--debug``, which shows the traceback.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Annotated, Any

import torch
import typer
from rich.console import Console

from ..data import DatasetUnavailableError
from ..errors import KronfactError
from ..version import __version__

app = typer.Typer(name="kronfact", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Compress neural networks by replacing linear layers with sums of Kronecker products.")
# On a terminal, its width; piped or redirected, wide enough that tables keep names and numbers whole.
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)


def _version(value: bool) -> None:
    if value:
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
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables (schema: README).")]


def run(debug: bool, body: Callable[[], None], flags: dict[str, str] | None = None) -> None:
    """Run a command's body; bad input → one line on stderr and exit code 2 (traceback with --debug).

    ``flags`` maps the library's argument names (``budget``) to the command's flags (``--budget``), so
    an error raised by the library names what the user typed.
    """
    def in_flags(text: str) -> str:
        text = " ".join(text.split())
        for name, flag in (flags or {}).items():  # budget=5 → --budget 5, method='x' → --method x, ratio= → --ratio
            text = re.sub(rf"(?<![\w.-]){name}=(?:'([^']*)'|(?=[^\s,;:)]))", rf"{flag} \1", text)
            text = re.sub(rf"(?<![\w.-]){name}=", flag, text)
        return text

    def show_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
        typer.echo(f"kronfact: warning: {in_flags(str(message))}", err=True)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            body()
    except (KronfactError, OSError, DatasetUnavailableError) as err:
        if debug:
            raise
        message = in_flags(str(err)) or type(err).__name__
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
        raise KronfactError("--rules is empty; give one or more module-name patterns such as 'mlp.*'")
    return patterns


def natural_key(name: str) -> list[Any]:
    return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in re.split(r"(\d+)", name)]



def fmt_shape(s: list[int] | tuple[int, ...]) -> str:
    return "×".join(str(v) for v in s)


def fmt_pair(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> str:
    return f"{fmt_shape(a)} ⊗ {fmt_shape(b)}"
