"""The package version, in one place (``kronfact.__version__``; written into kronfact.json)."""

__version__ = "0.1.0"
