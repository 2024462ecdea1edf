"""Elasticsearch's ``_source`` filtering, reimplemented so a widened hit can be cut back exactly.

Elasticsearch 8.x filters with one of two implementations, picked per request (``SourceFilter``):

- **map filtering** (``XContentMapValues.filter``) when an exclude pattern contains ``*``: a pattern
  is matched untrimmed against a value's whole dotted path, ``*`` spans dots, and a pattern that
  names an object covers everything below it. An object or array that an include pattern names
  keeps its place even when the excludes empty it; an object emptied inside an array is dropped.
- **path filtering** (Jackson's filtering parser driven by ``FilterPath``) otherwise: patterns are
  trimmed and split on dots into one segment per level, ``*`` matches within a segment, a ``**``
  segment stands for one or more levels. Excludes run first, then includes. Whatever the filtering
  empties disappears; an object or array that was empty already survives the excludes, not a
  partial include.

In both, a field name with dots matches like the object path it spells. OpenSearch (2.x, 3.x)
always filters the map way. The rules were read from the server's code and are pinned against a
real server by the tests (``tests/source_model.py`` and its integration test).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import IntEnum
from functools import lru_cache
from typing import Any, Literal

Engine = Literal["elasticsearch", "opensearch"]
# Java's String.trim(): every character up to and including the space.
_JAVA_TRIM = "".join(map(chr, range(0x21)))


class _Rel(IntEnum):
    """How a pattern relates to a path: names nothing there, could name something below, names it."""

    NONE = 0
    PARTIAL = 1
    FULL = 2


def uses_map_filtering(excludes: Sequence[str], engine: Engine = "elasticsearch") -> bool:
    return engine == "opensearch" or any("*" in p for p in excludes)


@lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    # Simple match: ``*`` is the only wildcard; everything else is literal.
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


# --- map filtering: patterns against the whole dotted path -----------------------------------------


def _map_rel(patterns: Sequence[str], path: str) -> _Rel:
    """FULL when a pattern matches ``path`` or one of its dot-prefixes (``p`` and ``p.*``); PARTIAL
    when some longer path starting with ``path`` could still match one."""
    cuts = [i for i, ch in enumerate(path) if ch == "."] + [len(path)]
    best = _Rel.NONE
    for pattern in patterns:
        rx = _glob(pattern)
        if any(rx.fullmatch(path, 0, cut) for cut in cuts):
            return _Rel.FULL
        head, star, _ = pattern.partition("*")
        if head.startswith(path) or (star and path.startswith(head)):
            best = _Rel.PARTIAL
    return best


class _MapFilter:
    def __init__(self, includes: Sequence[str], excludes: Sequence[str]) -> None:
        self.includes = includes
        self.excludes = excludes

    def _included(self, path: str, everything: bool) -> _Rel:
        return _Rel.FULL if everything else _map_rel(self.includes, path)

    def obj(self, node: dict[str, Any], prefix: str, everything: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            path = prefix + key
            inc = self._included(path, everything)
            if inc is _Rel.NONE or _map_rel(self.excludes, path) is _Rel.FULL:
                continue
            below_all = everything
            if inc is _Rel.FULL:
                if _map_rel(self.excludes, path + ".") is _Rel.NONE:
                    out[key] = value  # nothing below can be excluded: the value as it is
                    continue
                below_all = True
            if isinstance(value, dict):
                if self._included(path + ".", below_all) is _Rel.NONE:
                    continue
                sub = self.obj(value, path + ".", below_all)
                if sub or inc is _Rel.FULL:
                    out[key] = sub
            elif isinstance(value, list):
                items = self.array(value, path, below_all)
                if items or inc is _Rel.FULL:
                    out[key] = items
            elif inc is _Rel.FULL:
                out[key] = value
        return out

    def array(self, items: list[Any], path: str, everything: bool) -> list[Any]:
        scalars = self._included(path, everything) is _Rel.FULL
        out: list[Any] = []
        for item in items:
            if isinstance(item, dict):
                if self._included(path + ".", everything) is not _Rel.NONE:
                    sub = self.obj(item, path + ".", everything)
                    if sub:
                        out.append(sub)
            elif isinstance(item, list):
                nested = self.array(item, path, everything)
                if nested:
                    out.append(nested)
            elif scalars:
                out.append(item)
        return out


# --- path filtering: patterns as segments, one per level ------------------------------------------


def _names(key: str) -> tuple[str, ...]:
    """The levels a field name stands for: ``a.b`` is ``a`` then ``b`` (a first or last dot is not a
    separator)."""
    dot = key.find(".")
    if dot <= 0 or dot == len(key) - 1:
        return (key,)
    return (key[:dot], *_names(key[dot + 1 :]))


@lru_cache(maxsize=1024)
def _segments(pattern: str) -> tuple[str, ...]:
    """FilterPath's split: on every dot but one that starts what is left of the pattern."""
    dot = pattern.find(".")
    if dot <= 0:
        return (pattern,)
    return (pattern[:dot], *_segments(pattern[dot + 1 :]))


def _seg_rel(segs: tuple[str, ...], names: tuple[str, ...]) -> _Rel:
    if not segs:
        return _Rel.FULL
    if not names:
        return _Rel.PARTIAL
    if segs[0] == "**":  # one level, then either more of ``**`` or the rest of the pattern
        return max(_seg_rel(segs[1:], names[1:]), _seg_rel(segs, names[1:]))
    if _glob(segs[0]).fullmatch(names[0]) is None:
        return _Rel.NONE
    return _seg_rel(segs[1:], names[1:])


def _path_rel(patterns: Sequence[tuple[str, ...]], names: tuple[str, ...]) -> _Rel:
    return max((_seg_rel(p, names) for p in patterns), default=_Rel.NONE)


def _compile_path(patterns: Sequence[str]) -> list[tuple[str, ...]]:
    trimmed = (p.strip(_JAVA_TRIM) for p in patterns)
    return [_segments(p) for p in trimmed if p]  # a blank pattern names nothing


class _PathFilter:
    def __init__(self, patterns: list[tuple[str, ...]], inclusive: bool) -> None:
        self.patterns = patterns
        self.inclusive = inclusive

    def obj(self, node: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            path = names + _names(key)
            rel = _path_rel(self.patterns, path)
            if rel is _Rel.FULL:
                if self.inclusive:
                    out[key] = value
            elif rel is _Rel.NONE:
                if not self.inclusive:
                    out[key] = value
            else:
                kept, value = self.value(value, path)
                if kept:
                    out[key] = value
        return out

    def value(self, value: Any, names: tuple[str, ...]) -> tuple[bool, Any]:
        """(kept, filtered value) under a pattern that names something below ``names``."""
        sub: dict[str, Any] | list[Any]
        if isinstance(value, dict):
            sub = self.obj(value, names)
        elif isinstance(value, list):
            sub = []
            for item in value:
                kept, filtered = self.value(item, names)
                if kept:
                    sub.append(filtered)
        else:
            return not self.inclusive, value  # an include names something below a scalar: not it
        # Emptied by the filter: gone. Empty already: kept by the excludes, dropped by an include.
        return bool(sub) or (not value and not self.inclusive), sub


# --- entry points ------------------------------------------------------------------------------------


def filter_source(
    source: dict[str, Any],
    includes: Sequence[str],
    excludes: Sequence[str],
    engine: Engine = "elasticsearch",
) -> dict[str, Any]:
    """What the server returns as ``_source`` for these patterns (a new dict; ``source`` is not
    changed, unchanged sub-values are shared)."""
    if not includes and not excludes:
        return source
    if uses_map_filtering(excludes, engine):
        return _MapFilter(includes, excludes).obj(source, "", not includes)
    out = _PathFilter(_compile_path(excludes), inclusive=False).obj(source, ())
    if includes:
        out = _PathFilter(_compile_path(includes), inclusive=True).obj(out, ())
    return out


def names_path(patterns: Sequence[str], path: str, map_filtering: bool) -> bool:
    """True when one of ``patterns`` selects the field at dotted ``path`` as a whole (itself or an
    object above it), in the given filtering's terms."""
    if map_filtering:
        return _map_rel(patterns, path) is _Rel.FULL
    return _path_rel(_compile_path(patterns), _names_of_path(path)) is _Rel.FULL


def _names_of_path(path: str) -> tuple[str, ...]:
    return tuple(n for part in path.split(".") for n in _names(part))
