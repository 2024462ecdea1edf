"""Making the passage field visible to the reranker without changing what the client sees.

A client may ask for ``_source: false`` or exclude the very field the reranker reads. The proxy then
widens the filter it sends upstream just enough to get the passage field, and afterwards cuts each
hit back to what the client's own filter returns, with Elasticsearch's own filtering rules
(:mod:`proxy.source_semantics`).

Two promises beyond the hits themselves:

- the filter is read exactly as Elasticsearch reads it (``FetchSourceContext``): ``_source=`` takes
  only ``true`` and ``false`` as booleans, ``_source_includes`` replaces the includes ``_source=``
  gave, and any URL parameter replaces the body's ``_source`` (which is still parsed, and refused
  when malformed);
- the widened filter draws no warning the client's own request would not draw, and keeps the
  client's spelling (``include`` or ``includes``, a string or a list), so a deprecated spelling still
  earns its deprecation warning. Elasticsearch 8 warns about ``include``/``exclude``; OpenSearch 3
  also about an empty ``includes``/``excludes`` array, an object left without patterns and
  ``"_source": []``, and refuses a pattern that is both included and excluded (checked against
  both servers in ``tests/test_source_filter_server.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .source_semantics import Engine, filter_source, names_path, uses_map_filtering

SOURCE_PARAMS = ("_source", "_source_includes", "_source_excludes")
_INCLUDE_KEYS = ("includes", "include")  # the second is deprecated: Elasticsearch warns
_EXCLUDE_KEYS = ("excludes", "exclude")
# Stand-ins for a key the widening empties: "*" selects every field, "" none (Elasticsearch refuses
# empty or blank top-level field names); neither is an empty array.
_EVERYTHING = "*"
_NOTHING = ""

Shape = Literal["none", "bool", "string", "list", "object"]
ValueShape = Literal["string", "list", "empty"]


@dataclass(frozen=True)
class Spelling:
    """How the client wrote the body's ``_source``: its JSON shape and, for an object, each key in
    order with the shape of its value. ``none`` when it came from the URL or was absent."""

    shape: Shape = "none"
    keys: tuple[tuple[str, ValueShape], ...] = ()


@dataclass(frozen=True)
class SourceFilter:
    """What a request asks of ``_source``: fetch at all, and include/exclude patterns as given."""

    fetch: bool = True
    includes: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    spelling: Spelling = field(default=Spelling(), compare=False)

    def to_body(self) -> Any:
        """This filter as a body ``_source``, in the client's spelling and drawing no warning of its own."""
        if not self.fetch:
            return False
        if self.spelling.shape == "object":
            return self._object_body()
        if self.includes and not self.excludes and self.spelling.shape in ("string", "list"):
            if self.spelling.shape == "string" and len(self.includes) == 1:
                return self.includes[0]
            return list(self.includes)
        body = {k: list(v) for k, v in (("includes", self.includes), ("excludes", self.excludes)) if v}
        return body or True  # never {"includes": [], "excludes": []}

    def _object_body(self) -> dict[str, Any] | bool:
        """Every key the client wrote, in its order and value shape, carrying the widened patterns.

        An emptied key keeps a stand-in (``*``: every field, a blank: none): dropping it would lose
        a deprecated key's warning, and an empty array, or an object left without patterns, draws
        OpenSearch 3's. An empty array the client sent itself stays, with the warning it draws."""
        body: dict[str, Any] = {}
        for key, shape in self.spelling.keys:
            values = self.includes if key in _INCLUDE_KEYS else self.excludes
            if not values and shape != "empty":
                values = (_EVERYTHING,) if key in _INCLUDE_KEYS else (self._nothing(),)
            body[key] = values[0] if shape == "string" and len(values) == 1 else list(values)
        written = {key for key, _ in self.spelling.keys}
        for key, group, values in (
            ("includes", _INCLUDE_KEYS, self.includes),
            ("excludes", _EXCLUDE_KEYS, self.excludes),
        ):
            if values and written.isdisjoint(group):
                body[key] = list(values)
        return body or True

    def _nothing(self) -> str:
        """A blank exclude pattern that is not also an include (OpenSearch 3 refuses that)."""
        blank = _NOTHING
        while blank in self.includes:
            blank += " "
        return blank


@dataclass(frozen=True)
class SourcePatch:
    """How the upstream filter was widened, so each hit can be cut back to the client's filter."""

    original: SourceFilter
    upstream: SourceFilter
    fields: tuple[str, ...]
    engine: Engine = "elasticsearch"


class SourceFilterError(ValueError):
    """The request's ``_source`` has a shape Elasticsearch refuses, or one the servers disagree on
    (numbers and booleans in the array form): the request is left to the server."""


def _split_param(value: str) -> tuple[str, ...]:
    """Java's ``String.split(",")``: empty entries stay, except trailing ones."""
    parts = value.split(",")
    while parts and parts[-1] == "":
        parts.pop()
    return tuple(parts)


def _parse_params(params: Mapping[str, str], spelling: Spelling) -> SourceFilter:
    fetch = True
    includes: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    raw = params.get("_source")
    if raw == "false":
        fetch = False
    elif raw is not None and raw != "true":  # "1", "no", "TRUE"... are field patterns
        includes = _split_param(raw)
    if "_source_includes" in params:
        includes = _split_param(params["_source_includes"])
    if "_source_excludes" in params:
        excludes = _split_param(params["_source_excludes"])
    return SourceFilter(fetch, includes, excludes, spelling)


def _list_item(item: Any) -> str:
    # Elasticsearch takes a number's or a boolean's text here, OpenSearch 3 refuses them: either way
    # the request is left to the server, which answers it itself.
    if isinstance(item, str):
        return item
    raise SourceFilterError(f"[_source] array entries must be strings, got [{item!r}]")


def _object_value(value: Any, key: str) -> tuple[tuple[str, ...], ValueShape]:
    if isinstance(value, str):
        return (value,), "string"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value), "list" if value else "empty"
    raise SourceFilterError(f"[_source.{key}] must be a string or an array of strings")


def _parse_body(value: Any) -> SourceFilter:
    if value is None:
        return SourceFilter()
    if isinstance(value, bool):
        return SourceFilter(fetch=value, spelling=Spelling("bool"))
    if isinstance(value, str):
        return SourceFilter(includes=(value,), spelling=Spelling("string"))
    if isinstance(value, list):
        return SourceFilter(includes=tuple(map(_list_item, value)), spelling=Spelling("list"))
    if not isinstance(value, dict):
        raise SourceFilterError("[_source] must be a boolean, a string, an array or an object")
    includes: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    keys: list[tuple[str, ValueShape]] = []
    for key, item in value.items():  # a repeated meaning (include, then includes): the last one wins
        if key in _INCLUDE_KEYS:
            includes, shape = _object_value(item, key)
        elif key in _EXCLUDE_KEYS:
            excludes, shape = _object_value(item, key)
        else:  # exclude_vectors (Elasticsearch 8.19+) drops vector fields, and objects they empty,
            # by rules of its own that cutting back cannot mirror: left to the server
            raise SourceFilterError(f"[_source] key [{key}] is left to the server")
        keys.append((key, shape))
    return SourceFilter(True, includes, excludes, Spelling("object", tuple(keys)))


def parse_source_filter(body_source: Any, params: Mapping[str, str]) -> SourceFilter:
    """The filter Elasticsearch applies: the body's ``_source``, replaced as a whole by the URL's
    ``_source``/``_source_includes``/``_source_excludes`` when any is present.

    Raises :class:`SourceFilterError` for a body ``_source`` Elasticsearch would refuse, even when
    the URL overrides it: Elasticsearch parses the body first.
    """
    body = _parse_body(body_source)
    if not any(p in params for p in SOURCE_PARAMS):
        return body
    # Only an object body can draw a warning (a deprecated key) that the widened body must keep.
    return _parse_params(params, body.spelling if body.spelling.shape == "object" else Spelling())


def _returned(path: str, flt: SourceFilter, engine: Engine) -> bool:
    """Whether the client's filter returns the field at ``path`` whole."""
    by_map = uses_map_filtering(flt.excludes, engine)
    if flt.includes and not names_path(flt.includes, path, by_map):
        return False
    return not names_path(flt.excludes, path, by_map)


def plan_source(
    flt: SourceFilter, fields: Sequence[str], engine: Engine = "elasticsearch"
) -> SourcePatch | None:
    """None when every passage field already comes back; otherwise the widened upstream filter.

    The widened filter adds the passage fields to the includes (if any) and drops the excludes that
    select them; everything else is the client's. Cutting back is then filtering the widened hit
    with the client's filter, provided both filters are applied the same way: when dropping excludes
    would move Elasticsearch from map to path filtering (no ``*`` exclude left), whose rules for
    emptied objects differ, the whole ``_source`` is fetched instead.
    """
    if flt.fetch and all(_returned(f, flt, engine) for f in fields):
        return None
    includes: tuple[str, ...] = tuple(fields)
    excludes: tuple[str, ...] = ()
    if flt.fetch:
        by_map = uses_map_filtering(flt.excludes, engine)
        includes = flt.includes + tuple(f for f in fields if f not in flt.includes) if flt.includes else ()
        excludes = tuple(p for p in flt.excludes if not any(names_path((p,), f, by_map) for f in fields))
        if by_map and not uses_map_filtering(excludes, engine):
            includes, excludes = (), ()
    if set(flt.includes) & set(flt.excludes) and not set(includes) & set(excludes):
        # OpenSearch 3 refuses a pattern both included and excluded (even with _source=false); the
        # widened request must be refused too, so the client gets the answer to its own request.
        # "" names no field anywhere.
        includes, excludes = (*(includes or (_EVERYTHING,)), _NOTHING), (*excludes, _NOTHING)
    return SourcePatch(flt, SourceFilter(True, includes, excludes, flt.spelling), tuple(fields), engine)


def restore_hit(hit: dict[str, Any], patch: SourcePatch) -> None:
    """Cut one hit's ``_source`` back to what the client's own filter returns (in place)."""
    if "_source" not in hit:
        return
    original = patch.original
    if not original.fetch:
        del hit["_source"]
    elif isinstance(hit["_source"], dict):
        hit["_source"] = filter_source(hit["_source"], original.includes, original.excludes, patch.engine)


def restore_hits(hits: Iterable[dict[str, Any]], patch: SourcePatch | None) -> None:
    if patch is None:
        return
    for hit in hits:
        restore_hit(hit, patch)
