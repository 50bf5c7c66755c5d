"""The package's shape: the public API exactly, every submodule a module, no import cycle, small modules."""

import ast
import importlib
import pkgutil
import types
import warnings
from pathlib import Path

import pytest

import kronfact

PACKAGE = Path(kronfact.__file__).parent
MODULES = sorted(m.name for m in pkgutil.walk_packages(kronfact.__path__, "kronfact.")
                 if not m.name.endswith("__main__"))


def test_the_public_api_is_exactly_this():
    assert sorted(kronfact.__all__) == sorted([
        "CompressionReport", "FactorShape", "KronFactors", "KronLinear", "LambadaResult", "TrainConfig",
        "TrainResult", "compress", "decompose", "factor_shapes", "fold_permutations", "from_pretrained",
        "kron_spectrum", "lambada", "load", "merge", "perplexity", "save", "save_pretrained", "train"])
    assert all(getattr(kronfact, name) is not None for name in kronfact.__all__)
    assert isinstance(kronfact.__version__, str)


def test_every_submodule_resolves_to_a_module():
    assert "kronfact.train" in MODULES and "kronfact.cli.models" in MODULES
    for name in MODULES:
        parent, _, leaf = name.rpartition(".")
        assert isinstance(getattr(importlib.import_module(parent), leaf), types.ModuleType), name
    assert callable(kronfact.train) and kronfact.train.TrainConfig is kronfact.TrainConfig  # the module is the verb


def _top_level_imports(path: Path, module: str) -> set[str]:
    """The kronfact modules ``module`` imports at its top level (not inside functions or TYPE_CHECKING)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kronfact.")}
    return {m for m in found if m != module and m != "kronfact"}


def test_no_import_cycles():
    paths = {m: (PACKAGE.parent / m.replace(".", "/")).with_suffix(".py") for m in MODULES}
    paths.update({m: PACKAGE.parent / m.replace(".", "/") / "__init__.py" for m in MODULES
                  if (PACKAGE.parent / m.replace(".", "/")).is_dir()})
    graph = {m: _top_level_imports(p, m) for m, p in paths.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in graph.get(m, ()):
            assert state.get(n) != 1, f"import cycle: {' → '.join(stack + [m, n])}"
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_modules_stay_small():
    sizes = {p.relative_to(PACKAGE): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 410, {str(p): n for p, n in sizes.items() if n > 410}


def test_moved_names_still_import_with_a_deprecation_warning():
    from kronfact import data, pretrained, run

    moved = [("kronfact.io", "from_pretrained", pretrained.from_pretrained),
             ("kronfact.train", "calibration_batches", data.calibration_batches),
             ("kronfact.train", "load_tokens", data.load_tokens),
             ("kronfact.recipe", "run_recipe", run.run_recipe)]
    for module, name, now in moved:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert getattr(importlib.import_module(module), name) is now
        assert any(issubclass(w.category, DeprecationWarning) and name in str(w.message) for w in caught)
    with pytest.raises(AttributeError):
        importlib.import_module("kronfact.io").no_such_name  # noqa: B018
