"""A reference model of how Elasticsearch 8.19 filters ``_source``, written for the tests.

It is a literal transcription of the server's two code paths, kept independent of
``proxy/source_filter.py`` so the property tests compare two implementations, and it is pinned
against the real server in ``test_source_filter_server.py``:

- *path filtering* (``FilterPath`` + Jackson's filtering parser), used unless an exclude pattern
  contains ``*``: patterns are trimmed and split on dots into segments, ``*`` matches within one
  segment, a ``**`` segment stands for one or more levels; excludes are applied before includes; an
  object or array emptied by the filter disappears, one that was empty already stays when the
  exclude side keeps it, never when it is only reached through a partial include.
- *map filtering* (``XContentMapValues.filter``), used when an exclude pattern contains ``*``:
  patterns are matched untrimmed against the whole dotted path, ``*`` spans dots; an object or
  array that its include pattern names itself stays even when emptied, emptied objects inside
  arrays go.

OpenSearch (2.x, 3.x) always filters the map way.
"""

from __future__ import annotations

import re
from typing import Any, Literal

Engine = Literal["elasticsearch", "opensearch"]


def reference_filter(
    source: dict[str, Any],
    includes: list[str],
    excludes: list[str],
    engine: Engine = "elasticsearch",
) -> dict[str, Any]:
    """What the server returns as ``_source`` for ``{"includes": includes, "excludes": excludes}``."""
    if not includes and not excludes:
        return source
    if engine == "opensearch" or any("*" in e for e in excludes):
        return _MapModel(includes, excludes).filter_object(source, "", not includes)
    return _PathModel(includes, excludes).apply(source)


def read_source(value: Any) -> tuple[bool, list[str], list[str]]:
    """(fetch, includes, excludes) as the server reads a well-formed body ``_source``
    (``FetchSourceContext.fromXContent``): a repeated meaning (``include`` then ``includes``) keeps
    the last one."""
    if value is None or isinstance(value, bool):
        return value is not False, [], []
    if isinstance(value, str):
        return True, [value], []
    if isinstance(value, list):
        return True, [str(v) for v in value], []
    includes: list[str] = []
    excludes: list[str] = []
    for key, item in value.items():
        items = [item] if isinstance(item, str) else list(item)
        if key in ("includes", "include"):
            includes = items
        else:
            excludes = items
    return True, includes, excludes


# --- map filtering -------------------------------------------------------------------------------


def _glob_regex(pattern: str) -> str:
    return ".*".join(re.escape(part) for part in pattern.split("*"))


def _viable(pattern: str, prefix: str) -> bool:
    """Whether some string that starts with ``prefix`` matches the ``*`` glob ``pattern``."""
    # Positions in the pattern reachable after reading the prefix (``*`` may eat any characters).
    states = {0}
    for ch in prefix:
        nxt: set[int] = set()
        for i in _closure(pattern, states):
            if i < len(pattern) and pattern[i] == "*":
                nxt.add(i)
            elif i < len(pattern) and pattern[i] == ch:
                nxt.add(i + 1)
        states = nxt
        if not states:
            return False
    return True


def _closure(pattern: str, states: set[int]) -> set[int]:
    out = set(states)
    for i in sorted(states):
        j = i
        while j < len(pattern) and pattern[j] == "*":
            j += 1
            out.add(j)
    return out


class _MapModel:
    def __init__(self, includes: list[str], excludes: list[str]) -> None:
        self.includes = includes
        self.excludes = excludes

    @staticmethod
    def _accept(patterns: list[str], path: str) -> bool:
        # The pattern, or the pattern followed by ".anything" (an object named by the pattern).
        heads = [path] + [path[:i] for i, ch in enumerate(path) if ch == "."]
        return any(re.fullmatch(_glob_regex(p), h, re.DOTALL) for p in patterns for h in heads)

    def _live(self, patterns: list[str], path: str) -> bool:
        """Whether the automaton is not dead after reading ``path``."""
        return self._accept(patterns, path) or any(_viable(p, path) for p in patterns)

    def filter_object(self, obj: dict[str, Any], prefix: str, include_all: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            path = prefix + key
            if not include_all and not self._live(self.includes, path):
                continue
            if self._accept(self.excludes, path):
                continue
            included = include_all or self._accept(self.includes, path)
            child_all = include_all
            if included:
                if not self._live(self.excludes, path + "."):
                    out[key] = value
                    continue
                child_all = True
            if isinstance(value, dict):
                if not child_all and not self._live(self.includes, path + "."):
                    continue
                sub = self.filter_object(value, path + ".", child_all)
                if included or sub:
                    out[key] = sub
            elif isinstance(value, list):
                items = self.filter_list(value, path, child_all)
                if included or items:
                    out[key] = items
            elif included:
                out[key] = value
        return out

    def filter_list(self, items: list[Any], path: str, include_all: bool) -> list[Any]:
        keep_scalars = include_all or self._accept(self.includes, path)
        out: list[Any] = []
        for value in items:
            if isinstance(value, dict):
                if include_all or self._live(self.includes, path + "."):
                    sub = self.filter_object(value, path + ".", include_all)
                    if sub:
                        out.append(sub)
            elif isinstance(value, list):
                nested = self.filter_list(value, path, include_all)
                if nested:
                    out.append(nested)
            elif keep_scalars:
                out.append(value)
        return out


# --- path filtering ------------------------------------------------------------------------------

_JAVA_WHITESPACE = "".join(chr(c) for c in range(0x21))  # String.trim() strips every char <= ' '


def _segments(pattern: str) -> list[str]:
    """FilterPath's split: at each first dot that is not the first character."""
    out: list[str] = []
    rest = pattern
    while True:
        dot = rest.find(".")
        if dot > 0:
            out.append(rest[:dot])
            rest = rest[dot + 1 :]
        else:
            out.append(rest)
            return out


def _names(key: str) -> list[str]:
    """A field name with dots matches like the object path it spells (first/last dot excepted)."""
    dot = key.find(".")
    if dot <= 0 or dot == len(key) - 1:
        return [key]
    return [key[:dot], *_names(key[dot + 1 :])]


def _segment_matches(segment: str, name: str) -> bool:
    return re.fullmatch(_glob_regex(segment), name, re.DOTALL) is not None


class _PathModel:
    """States are (pattern, next segment index); ``**`` keeps its state after consuming a name."""

    def __init__(self, includes: list[str], excludes: list[str]) -> None:
        trimmed_inc = [p.strip(_JAVA_WHITESPACE) for p in includes]
        trimmed_exc = [p.strip(_JAVA_WHITESPACE) for p in excludes]
        self.includes = [_segments(p) for p in trimmed_inc if p] if includes else None
        self.excludes = [_segments(p) for p in trimmed_exc if p]

    @staticmethod
    def _step(states: list[tuple[list[str], int]], key: str) -> tuple[bool, list[tuple[list[str], int]]]:
        """(matched completely, states to carry into the value) after reading one field name."""
        for name in _names(key):
            nxt: list[tuple[list[str], int]] = []
            for segs, i in states:
                if i > 0 and segs[i - 1] == "**":
                    nxt.append((segs, i))  # ``**`` absorbs this name too
                if i < len(segs) and _segment_matches(segs[i], name):
                    if i + 1 == len(segs):
                        return True, []
                    nxt.append((segs, i + 1))
            states = nxt
        return False, states

    def apply(self, source: dict[str, Any]) -> dict[str, Any]:
        kept = self._exclude_object(source, [(s, 0) for s in self.excludes])
        if self.includes is None:
            return kept
        return self._include_object(kept, [(s, 0) for s in self.includes])

    def _exclude_object(self, obj: dict[str, Any], states: list[tuple[list[str], int]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            matched, nxt = self._step(states, key)
            if matched:
                continue
            if not nxt:
                out[key] = value
                continue
            filtered, keep = self._exclude_value(value, nxt)
            if keep:
                out[key] = filtered
        return out

    def _exclude_value(self, value: Any, states: list[tuple[list[str], int]]) -> tuple[Any, bool]:
        if isinstance(value, dict):
            sub = self._exclude_object(value, states)
            return sub, bool(sub) or not value
        if isinstance(value, list):
            items = []
            for item in value:
                filtered, keep = self._exclude_value(item, states)
                if keep:
                    items.append(filtered)
            return items, bool(items) or not value
        return value, True

    def _include_object(self, obj: dict[str, Any], states: list[tuple[list[str], int]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            matched, nxt = self._step(states, key)
            if matched:
                out[key] = value
            elif nxt:
                filtered, keep = self._include_value(value, nxt)
                if keep:
                    out[key] = filtered
        return out

    def _include_value(self, value: Any, states: list[tuple[list[str], int]]) -> tuple[Any, bool]:
        if isinstance(value, dict):
            sub = self._include_object(value, states)
            return sub, bool(sub)
        if isinstance(value, list):
            items = []
            for item in value:
                filtered, keep = self._include_value(item, states)
                if keep:
                    items.append(filtered)
            return items, bool(items)
        return value, False
