"""Which rule a search goes by: the indices it names, matched against ``rules:`` patterns.

Pure functions, no I/O: the proxy cannot ask the cluster what an expression resolves to without one
more round trip per search, so it matches what the request *says*:

- an index expression is a comma list (``a,b``), or a list in an ``_msearch`` header; entries that
  start with ``-`` are exclusions, which narrow what Elasticsearch searches but name no index of
  their own, so they pick no rule (they are kept, for the log);
- each named entry is matched, as written, against each rule's patterns in order, ``*`` matching any
  run of characters (Elasticsearch's simple wildcard, case-sensitive); the first rule that matches
  wins; an entry no rule matches goes by the default (the rerank section, model ``default``);
- a request wildcard is text like any other: ``docs-de-*`` matches a rule for ``docs-de-*`` or
  ``docs-*``, but a request for ``docs-*`` does not match a rule for ``docs-de-*`` (it may reach other
  indices too), so it goes by the default;
- an alias is matched by its own name, never by the indices behind it;
- a search that names no index (``/_search``) is a search of ``_all``; ``_all`` and ``*`` go by the
  default unless a rule's pattern covers the text itself (``*`` does, and so does ``_all``);
- when the entries go by different rules the search is not reranked (``mixed_rules``): one list of
  hits cannot be ordered by two models, and scores of two models are not on one scale. Rules that
  name the same model with the same search settings count as one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

from .config import DEFAULT_MODEL, RULE_KEYS, RerankConfig, Rule

MIXED_RULES = "mixed_rules"  # the reason a search whose indices go by different rules is not reranked
ALL = "_all"  # what a search that names no index searches


@dataclass(frozen=True)
class Indices:
    """An index expression taken apart: the entries that name indices, and the exclusions."""

    names: tuple[str, ...]
    excluded: tuple[str, ...] = ()


@dataclass(frozen=True)
class Choice:
    """The rule every named index goes by; ``excluded``: the expression's exclusions, ignored."""

    rule: Rule
    excluded: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mixed:
    """The named indices go by different rules: ``picks`` says which index picked which model."""

    picks: tuple[tuple[str, str], ...]
    reason: str = MIXED_RULES


def default_rule(rerank: RerankConfig) -> Rule:
    """The rerank section as a rule: what every index no rule names goes by."""
    return Rule((), DEFAULT_MODEL, rerank)


def parse_indices(expression: str | Sequence[str] | None) -> Indices:
    """``a,-b,c`` or ``["a", "c"]`` as names and exclusions; nothing named means :data:`ALL`.

    Empty entries (``a,,b``) name nothing; Elasticsearch's own answer judges such a request."""
    if expression is None:
        entries: list[str] = []
    elif isinstance(expression, str):
        entries = expression.split(",")
    else:
        entries = [part for item in expression for part in item.split(",")]
    entries = [e.strip() for e in entries if e.strip()]
    names = tuple(e for e in entries if not e.startswith("-"))
    excluded = tuple(e for e in entries if e.startswith("-"))
    return Indices(names or (ALL,), excluded)


def path_indices(path: str) -> str | None:
    """The index expression of ``/{index}/_search...``, from the path as sent (percent-encoded: a
    ``%2C`` is a comma, as Elasticsearch reads it); None for a path that names none (``/_search``).
    No index name starts with ``_``, so such a first segment is an API (``_all`` means all)."""
    first = path.lstrip("/").split("/", 1)[0]
    return None if not first or first.startswith("_") else unquote(first)


def item_indices(header: Mapping[str, Any], path_expression: str | None) -> str | list[str] | None:
    """An ``_msearch`` item's index expression: its header's ``index`` (a string or a list of
    strings), else the URL's, as Elasticsearch reads it."""
    value = header.get("index")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return path_expression


@lru_cache(maxsize=1024)
def _wildcard(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


def pattern_matches(pattern: str, name: str) -> bool:
    """Elasticsearch's simple match: ``*`` is any run of characters, every other character itself."""
    return _wildcard(pattern).fullmatch(name) is not None


def rule_for(name: str, rules: Sequence[Rule]) -> Rule | None:
    """The first rule with a pattern that matches ``name``; None when none does."""
    for rule in rules:
        if any(pattern_matches(p, name) for p in rule.index):
            return rule
    return None


def _settings(rule: Rule) -> tuple[Any, ...]:
    """What makes two rules serve a search differently: the model, and the search settings a rule
    sets. Everything else comes from the model's entry or the rerank section, so it follows."""
    return (rule.model, *(getattr(rule.rerank, key) for key in RULE_KEYS))


def choose(expression: str | Sequence[str] | None, rules: Sequence[Rule], default: Rule) -> Choice | Mixed:
    """The rule a search of ``expression`` goes by, or :class:`Mixed` when its indices disagree."""
    indices = parse_indices(expression)
    picked = [(name, rule_for(name, rules) or default) for name in indices.names]
    if len({_settings(rule) for _, rule in picked}) > 1:
        return Mixed(tuple((name, rule.model) for name, rule in picked))
    return Choice(picked[0][1], indices.excluded)
