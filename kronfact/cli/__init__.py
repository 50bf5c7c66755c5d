"""The ``kronfact`` command: analyze / compress / eval / merge / info / recipe.

One module per group of commands, each only parsing arguments and printing: :mod:`.analyze`,
:mod:`.models` (compress, eval, merge, info), :mod:`.recipe`; :mod:`.core` holds the typer app, the
global options (``--version``, ``--threads``) and the error handling every command shares. The work
itself is the library's.
"""

from . import analyze, models  # noqa: F401  (each registers its commands on app)
from .core import app, console, rule_list
from .recipe import recipe_app

app.add_typer(recipe_app, name="recipe")

__all__ = ["app", "console", "rule_list"]
