"""Elasticsearch's ``filter_path`` response filtering, applied by the proxy to answers it rewrites.

The proxy strips ``filter_path`` from a search it reranks (it needs the hits Elasticsearch would have
filtered away) and applies the client's expression to the final answer. The rules are Elasticsearch's
(``FilterPath`` and ``FilterPathBasedFilter``), pinned in the tests against the real server's answers:

- a comma list of dotted paths; ``*`` in a segment matches any characters of one key; ``**`` matches
  any number of levels, none included; arrays are transparent (a path goes through every element);
- a path starting with ``-`` excludes; exclusions are applied first, then the inclusions, if any;
- inclusion keeps what a path reaches in full, and the objects and arrays on the way only when
  something inside them was kept; exclusion drops what a path reaches and any object or array it
  leaves empty, while one that was empty to begin with stays;
- an answer filtered down to nothing is ``{}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

Path = tuple[str, ...]
_DROP = object()  # what a filtered-away value becomes


@dataclass(frozen=True)
class FilterPath:
    includes: tuple[Path, ...]
    excludes: tuple[Path, ...]


@lru_cache(maxsize=256)
def parse_filter_path(expression: str) -> FilterPath:
    """The parsed ``filter_path`` value; empty entries are ignored, as Elasticsearch ignores them."""
    includes: list[Path] = []
    excludes: list[Path] = []
    for raw in expression.split(","):
        entry = raw.strip()
        target = includes
        if entry.startswith("-"):
            entry, target = entry[1:], excludes
        if entry:
            target.append(tuple(entry.split(".")))
    return FilterPath(tuple(includes), tuple(excludes))


@lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


def matches_glob(key: str, pattern: str) -> bool:
    """Elasticsearch's simple glob: ``*`` is the only wildcard."""
    return pattern == key or ("*" in pattern and _glob(pattern).fullmatch(key) is not None)


def _advance(paths: tuple[Path, ...], key: str) -> tuple[tuple[Path, ...], bool]:
    """The paths left after ``key``, and whether one of them has reached its end (a full match)."""
    left: list[Path] = []
    full = False
    pending = list(paths)
    while pending:
        path = pending.pop()
        if not path:
            continue
        head = path[0]
        if head == "**":
            pending.append(path[1:])  # ** matches no level
            left.append(path)  # ** takes this level and stays
            if all(p == "**" for p in path):
                full = True
            continue
        if matches_glob(key, head):
            rest = path[1:]
            if all(p == "**" for p in rest):
                full = True
            if rest:
                left.append(rest)
    return tuple(left), full


def _include(node: Any, paths: tuple[Path, ...]) -> Any:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            rest, full = _advance(paths, key)
            if full:
                out[key] = value
            elif rest:
                kept = _include(value, rest)
                if kept is not _DROP:
                    out[key] = kept
        return out if out else _DROP
    if isinstance(node, list):
        items = [kept for item in node if (kept := _include(item, paths)) is not _DROP]
        return items if items else _DROP
    return _DROP


def _exclude(node: Any, paths: tuple[Path, ...]) -> Any:
    if isinstance(node, dict):
        if not node:
            return node
        out: dict[str, Any] = {}
        for key, value in node.items():
            rest, full = _advance(paths, key)
            if full:
                continue
            kept = _exclude(value, rest) if rest else value
            if kept is not _DROP:
                out[key] = kept
        return out if out else _DROP
    if isinstance(node, list):
        if not node:
            return node
        items = [kept for item in node if (kept := _exclude(item, paths)) is not _DROP]
        return items if items else _DROP
    return node


def apply_filter_path(answer: dict[str, Any], expression: str) -> dict[str, Any]:
    """The answer as Elasticsearch would have sent it with ``?filter_path=expression``."""
    flt = parse_filter_path(expression)
    if not flt.includes and not flt.excludes:
        return answer
    out: Any = answer
    if flt.excludes:
        out = _exclude(out, flt.excludes)
    if flt.includes and out is not _DROP:
        out = _include(out, flt.includes)
    return out if isinstance(out, dict) else {}
