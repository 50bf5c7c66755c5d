"""Which modules of a model to compress: patterns over qualified module names.

A pattern is

- a glob (``fnmatch``: ``*`` ``?`` ``[...]``; ``*`` also crosses dots) matched against a module's
  qualified name and against each of its dotted suffixes: "mlp.*" matches "transformer.h.3.mlp.c_fc"
  (through the suffix "mlp.c_fc"), "h.0.mlp.c_fc" matches block 0 only;
- ``"re:<regex>"``: a regular expression searched in the qualified name (unanchored: use ``^``/``$``
  or ``\\.`` boundaries to anchor it), llm-compressor's convention;
- either of the above after a leading ``"!"``: an exclusion. Exclusions remove modules whatever their
  position in the list.

``rules`` is one pattern, a list of patterns, or a dict {pattern: options} whose options (``shape_a``,
``rank``, ``init``, ``max_rank``, ``prune_index``) apply to the modules the pattern selects; when several
patterns select a module their options merge in order, later patterns winning.

Patterns select among eligible modules (:func:`kronfact.modules.is_eligible`: nn.Linear and
transformers' Conv1D) only, so "mlp.*" skips GPT-2's activation "mlp.act". Errors, all ValueError:

- a pattern that matches no eligible module (the message lists the closest names, or the non-eligible
  modules it named);
- a selected module whose parameters are shared with another module (tied weights are never split);
- the output embedding / LM head is skipped unless a rule names it exactly (a pattern without
  wildcards that equals its name or a dotted suffix of it), and naming it is an error while it is tied
  to the input embedding.

In BERT/ViT a bare "output.dense" also matches "attention.output.dense": anchor it
(``r"re:layer\\.\\d+\\.output\\.dense$"``) or exclude the other (``"!attention.output.dense"``).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import KronfactError
from .modules import is_eligible, storage_key

Rules = str | Sequence[str] | Mapping[str, Mapping[str, Any] | None]
OPTION_KEYS: tuple[str, ...] = ("shape_a", "rank", "init", "max_rank", "prune_index")
_GLOB_CHARS = set("*?[")
_LISTED = 6  # names shown in an error message


@dataclass(frozen=True)
class Rule:
    """One parsed pattern: ``pattern`` as given (with its "!" / "re:" prefixes), its options."""

    pattern: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def exclude(self) -> bool:
        return self.pattern.startswith("!")

    @property
    def body(self) -> str:
        """The pattern without its "!"."""
        return self.pattern[1:] if self.exclude else self.pattern

    @property
    def literal(self) -> bool:
        """True for a plain name (no wildcard, no regex): it names modules exactly."""
        return not self.body.startswith("re:") and not (_GLOB_CHARS & set(self.body))

    def matches(self, name: str) -> bool:
        """Whether the pattern (ignoring "!") selects the module called ``name``."""
        if self.body.startswith("re:"):
            return re.search(self.body[3:], name) is not None
        parts = name.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[i:]), self.body) for i in range(len(parts)))


def parse_rules(rules: Rules) -> list[Rule]:
    """``rules`` (a pattern, a list of patterns or a dict {pattern: options}) → validated :class:`Rule` s."""
    if isinstance(rules, str):
        items: list[tuple[Any, Any]] = [(rules, None)]
    elif isinstance(rules, Mapping):
        items = list(rules.items())
    elif isinstance(rules, Sequence):
        items = [(r, None) for r in rules]
    else:
        raise KronfactError(f"rules must be a pattern, a list of patterns or a dict {{pattern: options}}, "
                            f"got {type(rules).__name__}")
    if not items:
        raise KronfactError("rules is empty: give at least one pattern, e.g. 'mlp.*'")
    parsed = []
    for pattern, options in items:
        if not isinstance(pattern, str):
            raise KronfactError(f"every pattern must be a string, got {pattern!r}")
        rule = Rule(pattern, _check_options(pattern, options))
        if not rule.body or rule.body == "re:":
            raise KronfactError(f"empty pattern {pattern!r}: give a module name, a glob such as 'mlp.*' or "
                                f"'re:<regex>'")
        if rule.body.startswith("re:"):
            try:
                re.compile(rule.body[3:])
            except re.error as err:
                raise KronfactError(f"pattern {pattern!r} is not a valid regular expression: {err}") from None
        if rule.exclude and rule.options:
            raise KronfactError(f"exclusion {pattern!r} cannot carry options ({', '.join(rule.options)})")
        parsed.append(rule)
    if all(r.exclude for r in parsed):
        raise KronfactError(f"rules {[r.pattern for r in parsed]} only exclude; add a pattern that selects "
                            "modules, e.g. ['mlp.*', '!h.0.mlp.c_fc']")
    return parsed


def _check_options(pattern: str, options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise KronfactError(f"options of pattern {pattern!r} must be a dict with keys among {OPTION_KEYS}, "
                            f"got {type(options).__name__}")
    unknown = [k for k in options if k not in OPTION_KEYS]
    if unknown:
        raise KronfactError(f"unknown option(s) {unknown} for pattern {pattern!r}; allowed: {', '.join(OPTION_KEYS)}")
    return {k: v for k, v in options.items() if v is not None}


@dataclass(frozen=True)
class Target:
    """A module the rules select: its first qualified name, any other names of the same module object
    (shared submodules are replaced everywhere at once), and its merged per-rule options."""

    name: str
    module: nn.Module
    aliases: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


def output_heads(model: nn.Module) -> set[int]:
    """ids of the modules acting as output embedding: ``model.get_output_embeddings()`` and every
    eligible module whose weight is an input embedding's (tied)."""
    heads = set()
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except Exception:  # noqa: BLE001 — models may not implement it (NotImplementedError, AttributeError…)
            head = None
        if isinstance(head, nn.Module):
            heads.add(id(head))
    embeddings = {storage_key(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads |= {id(m) for m in model.modules() if is_eligible(m) and storage_key(m.weight) in embeddings}
    return heads


def _shared_with(model: nn.Module, module: nn.Module, names: Sequence[str]) -> list[str]:
    """Parameters of the model outside ``module`` (known as ``names``) that share storage with its own."""
    own = {storage_key(p) for p in module.parameters()}
    mine = tuple(f"{n}." for n in names)
    return [n for n, p in model.named_parameters(remove_duplicate=False)
            if storage_key(p) in own and not n.startswith(mine)]


def _generalize(name: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _closest(pattern: str, names: Sequence[str]) -> str:
    """Patterns close to ``pattern`` among the dotted suffixes of ``names`` (block numbers as '*')."""
    suffixes = sorted({".".join(parts[i:]) for n in names for parts in [_generalize(n).split(".")]
                       for i in range(len(parts))})
    close = difflib.get_close_matches(pattern.removeprefix("re:"), suffixes, n=_LISTED, cutoff=0.5)
    if close:
        return "closest: " + ", ".join(repr(c) for c in close)
    shown = sorted(names)[:_LISTED]
    return "eligible modules include " + ", ".join(shown) + (" …" if len(names) > len(shown) else "")


def _no_match(rule: Rule, modules: dict[str, nn.Module], eligible: list[str], heads: list[str]) -> KronfactError:
    hit = [n for n, m in modules.items() if rule.matches(n)]
    if heads:
        return KronfactError(f"pattern {rule.pattern!r} matches only the output embedding {', '.join(heads)}, which "
                             "is left out unless a rule names it exactly (e.g. 'lm_head', no wildcards)")
    if hit:
        shown = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in hit[:_LISTED])
        hint = ""
        inside = [n for n in eligible if any(n.startswith(h + ".") for h in hit)]
        if inside and not rule.body.startswith("re:"):
            hint = f"; to compress the layers inside, use {rule.body + '.*'!r}"
        return KronfactError(f"pattern {rule.pattern!r} matches no layer kronfact can replace, only "
                             f"{shown}{' …' if len(hit) > _LISTED else ''}; eligible layers are nn.Linear and "
                             f"transformers Conv1D{hint}")
    return KronfactError(f"pattern {rule.pattern!r} matches no nn.Linear / Conv1D module; "
                         f"{_closest(rule.body, eligible)}")


def select(model: nn.Module, rules: Rules) -> list[Target]:
    """The eligible modules of ``model`` that ``rules`` select, in module order, each once.

    Raises ValueError (see the module docstring) before anything is changed.
    """
    parsed = parse_rules(rules)
    by_id: dict[int, list[str]] = {}
    modules: dict[str, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if name:  # the root itself cannot be replaced in place
            by_id.setdefault(id(m), []).append(name)
            modules[name] = m
    eligible = [n for n, m in modules.items() if is_eligible(m)]
    if not eligible:
        what = " (the model is itself one; wrap it in a module)" if is_eligible(model) else ""
        raise KronfactError(f"{type(model).__name__} has no nn.Linear or Conv1D submodule to compress{what}")
    heads = output_heads(model)

    chosen: dict[int, dict[str, Any]] = {}  # id → options, in first-selected order
    excluded: set[int] = set()
    for rule in parsed:
        hits = [n for n in eligible if rule.matches(n)]
        named_heads = [n for n in hits if id(modules[n]) in heads]
        if not (rule.literal or rule.exclude):
            hits = [n for n in hits if id(modules[n]) not in heads]
        if not hits:
            raise _no_match(rule, modules, eligible, named_heads)
        for n in hits:
            key = id(modules[n])
            if rule.exclude:
                excluded.add(key)
            else:
                chosen.setdefault(key, {}).update(rule.options)

    targets = []
    for name in eligible:
        key = id(modules[name])
        if key not in chosen or key in excluded or by_id[key][0] != name:
            continue
        names = by_id[key]
        shared = _shared_with(model, modules[name], names)
        if shared:
            tie = "tied to the input embedding " if key in heads else "shared with "
            raise KronfactError(f"{name} has parameters {tie}{', '.join(shared[:_LISTED])}; replacing it would split "
                                f"the tie. Exclude it (e.g. '!{name}') or untie the weights first")
        targets.append(Target(name, modules[name], tuple(names[1:]), chosen[key]))
    if not targets:
        raise KronfactError(f"rules {[r.pattern for r in parsed]} select no module once the exclusions are applied")
    return targets
