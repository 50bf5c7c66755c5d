"""The one exception type for bad input.

>>> issubclass(KronfactError, ValueError)
True
"""


class KronfactError(ValueError):
    """A problem with the user's input (a file, an argument, a model): its message names the problem
    and the way out. The CLI prints it as one line and exits with code 2; any other exception is a bug."""
