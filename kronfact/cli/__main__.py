"""``python -m kronfact.cli``: the ``kronfact`` command (as torchrun runs it)."""

from . import app

app()
