"""Making the passage field visible to the reranker without changing what the client sees.

A client may ask for ``_source: false`` or exclude the very field the reranker reads. The proxy then
widens the filter it sends upstream just enough to get the passage field, and afterwards removes from
each hit exactly what the client's own filter would have removed. Matching follows Elasticsearch's
source filtering: ``*`` spans any characters (dots included) and a pattern that names an object
covers everything below it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

SOURCE_PARAMS = ("_source", "_source_includes", "_source_excludes")


@dataclass(frozen=True)
class SourceFilter:
    """What a request asks of ``_source``: fetch at all, and include/exclude patterns."""

    fetch: bool = True
    includes: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()

    def to_body(self) -> dict[str, Any]:
        return {"includes": list(self.includes), "excludes": list(self.excludes)}


@dataclass(frozen=True)
class SourcePatch:
    """How the upstream filter was widened, so each hit can be cut back to the client's filter."""

    original: SourceFilter
    upstream: SourceFilter
    fields: tuple[str, ...]
    dropped_excludes: tuple[str, ...]


class SourceFilterError(ValueError):
    """The request's ``_source`` option has a shape Elasticsearch would reject too."""


def _patterns(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(p for p in value.split(",") if p) if key == "url" else (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise SourceFilterError(f"[_source] {key} must be a string or a list of strings")


def parse_source_filter(body_source: Any, params: dict[str, str]) -> SourceFilter:
    """The effective filter: URL parameters, when present, replace the body's ``_source``."""
    if any(p in params for p in SOURCE_PARAMS):
        raw = params.get("_source")
        fetch = True
        includes: tuple[str, ...] = ()
        if raw is not None:
            if raw.lower() in {"false", "0", "no", "off"}:
                fetch = False
            elif raw.lower() not in {"true", "1", "yes", "on", ""}:
                includes = _patterns(raw, "url")
        includes = includes + _patterns(params.get("_source_includes"), "url")
        excludes = _patterns(params.get("_source_excludes"), "url")
        return SourceFilter(fetch, includes, excludes)
    if body_source is None or body_source is True:
        return SourceFilter()
    if body_source is False:
        return SourceFilter(fetch=False)
    if isinstance(body_source, (str, list)):
        return SourceFilter(includes=_patterns(body_source, "includes"))
    if isinstance(body_source, dict):
        inc = body_source.get("includes", body_source.get("include"))
        exc = body_source.get("excludes", body_source.get("exclude"))
        return SourceFilter(includes=_patterns(inc, "includes"), excludes=_patterns(exc, "excludes"))
    raise SourceFilterError("[_source] must be a boolean, a string, a list or an object")


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    # Elasticsearch's simple match: ``*`` is the only wildcard; everything else is literal.
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


def _ancestors_and_self(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def matches(path: str, pattern: str) -> bool:
    """True when the pattern selects ``path`` itself or an object that contains it."""
    return any(_compiled(pattern).fullmatch(p) for p in _ancestors_and_self(path))


def fully_included(path: str, flt: SourceFilter) -> bool:
    if not flt.fetch:
        return False
    if flt.includes and not any(matches(path, p) for p in flt.includes):
        return False
    return not any(matches(path, p) for p in flt.excludes)


def plan_source(flt: SourceFilter, fields: Sequence[str]) -> SourcePatch | None:
    """None when every passage field already comes back; otherwise the widened upstream filter."""
    if all(fully_included(f, flt) for f in fields):
        return None
    if not flt.fetch:
        upstream = SourceFilter(includes=tuple(fields))
        return SourcePatch(flt, upstream, tuple(fields), ())
    includes = flt.includes + tuple(f for f in fields if f not in flt.includes) if flt.includes else ()
    kept = tuple(p for p in flt.excludes if not any(matches(f, p) for f in fields))
    dropped = tuple(p for p in flt.excludes if p not in kept)
    return SourcePatch(flt, SourceFilter(True, includes, kept), tuple(fields), dropped)


def _prune(node: Any, prefix: str, remove: Callable[[str], bool], keep: set[str]) -> None:
    """Delete keys that ``remove`` selects, except paths in ``keep`` and the objects holding them."""
    if isinstance(node, list):
        for item in node:
            _prune(item, prefix, remove, keep)
        return
    if not isinstance(node, dict):
        return
    for key in list(node):
        path = f"{prefix}{key}"
        if path in keep:
            continue
        if any(k.startswith(path + ".") for k in keep):
            _prune(node[key], path + ".", remove, keep)
        elif remove(path):
            del node[key]
        else:
            _prune(node[key], path + ".", remove, keep)


def _remove_field(node: Any, parts: list[str], prefix: str, original: SourceFilter) -> None:
    """Remove one dotted field; an object it leaves empty goes too unless the client's filter kept it."""
    if isinstance(node, list):
        for item in node:
            _remove_field(item, parts, prefix, original)
        return
    if not isinstance(node, dict) or parts[0] not in node:
        return
    key, path = parts[0], prefix + parts[0]
    if len(parts) == 1:
        del node[key]
        return
    _remove_field(node[key], parts[1:], path + ".", original)
    if node[key] == {} and not fully_included(path, original):
        del node[key]


def restore_hit(hit: dict[str, Any], patch: SourcePatch) -> None:
    """Cut one hit's ``_source`` back to what the client's own filter returns (in place)."""
    if "_source" not in hit:
        return
    if not patch.original.fetch:
        del hit["_source"]
        return
    source = hit["_source"]
    passage = {f for f in patch.fields if not fully_included(f, patch.original)}
    if patch.dropped_excludes:

        def excluded(path: str) -> bool:
            return any(matches(path, p) for p in patch.dropped_excludes)

        _prune(source, "", excluded, passage)
    for field in sorted(passage):
        _remove_field(source, field.split("."), "", patch.original)


def restore_hits(hits: Iterable[dict[str, Any]], patch: SourcePatch | None) -> None:
    if patch is None:
        return
    for hit in hits:
        restore_hit(hit, patch)
