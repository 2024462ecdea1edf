"""Deciding, for one ``_search`` request, whether to rerank and what to ask Elasticsearch for.

Pure functions on the parsed request: no I/O, so every rule here is tested without a server. The
result is either a :class:`Passthrough` (with the reason the client will see in a header) or a
:class:`RerankPlan` holding the widened upstream request and what is needed to cut the answer back to
the client's window.

Elasticsearch reads ``from``, ``size``, ``sort``, ``q`` and the ``_source`` parameters from the URL in
preference to the body, so the URL is checked first everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from .config import DEFAULT_MODEL, Config, RerankConfig
from .errors import BadRequest
from .fusion import Fusion
from .query_text import extract_query_text, lucene_to_text, text_at_path
from .rules import Mixed, choose, default_rule
from .source_filter import (
    SOURCE_PARAMS,
    SourceFilter,
    SourceFilterError,
    SourcePatch,
    parse_source_filter,
    plan_source,
)
from .source_semantics import Engine

# The reserved body key for per-request options; removed before the body reaches Elasticsearch.
OVERRIDE_KEY = "_rerank"
# Per-request option headers; never forwarded.
HEADER_QUERY = "X-Rerank-Query"
HEADER_FIELD = "X-Rerank-Field"
HEADER_TOP_K = "X-Rerank-Top-K"
HEADER_ENABLED = "X-Rerank-Enabled"
OVERRIDE_HEADERS = (HEADER_QUERY, HEADER_FIELD, HEADER_TOP_K, HEADER_ENABLED)

# /_search, /_search/template, /_msearch, /_msearch/template, each also under /{index}/, where index
# may be a comma list, wildcard, alias or _all.
_ENDPOINT = re.compile(r"^/(?:(?:_all|[^/_][^/]*)/)?(?P<kind>_search|_msearch)(?P<template>/template)?/?$")
SEARCH, TEMPLATE, MSEARCH, MSEARCH_TEMPLATE = "search", "template", "msearch", "msearch_template"
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
DEFAULT_SIZE = 10


@dataclass(frozen=True)
class Overrides:
    """Per-request options a client may set; none of them can touch server settings."""

    query: str | None = None
    fields: tuple[str, ...] | None = None
    top_k: int | None = None
    enabled: bool | None = None
    relevant: dict[str, int] | None = None  # judged doc ids -> grade, for online relevance tracking
    fusion: dict[str, Any] | None = None  # fusion options given with the request (mode, k, weight)


@dataclass(frozen=True)
class Passthrough:
    """Forward the request unchanged; ``reason`` goes back in the ``X-Rerank-Reason`` header."""

    reason: str


@dataclass(frozen=True)
class RerankPlan:
    query: str
    fields: tuple[str, ...]
    top_k: int
    start: int
    size: int
    dropped_params: frozenset[str]
    body: dict[str, Any]
    source: SourcePatch | None
    relevant: dict[str, int] | None = None
    filter_path: str | None = None  # the client's, applied by the proxy to the final answer
    fusion: Fusion = field(default_factory=Fusion)  # how the model's and ES's orders combine
    model: str = DEFAULT_MODEL  # the name of the model that scores it (its rule's)


def search_endpoint(method: str, path: str) -> str | None:
    """Which search API a request calls (:data:`SEARCH`, :data:`TEMPLATE`, :data:`MSEARCH`,
    :data:`MSEARCH_TEMPLATE`), or None for every other request."""
    found = _ENDPOINT.match(path) if method in ("GET", "POST") else None
    if found is None:
        return None
    if found["kind"] == "_search":
        return TEMPLATE if found["template"] else SEARCH
    return MSEARCH_TEMPLATE if found["template"] else MSEARCH


def is_search_path(method: str, path: str) -> bool:
    """A request the proxy must read whole: one of the search APIs."""
    return search_endpoint(method, path) is not None


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise BadRequest(f"[{name}] must be true or false, got [{value}]")


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise BadRequest(f"[{name}] must be an integer, got [{value}]")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"[{name}] must be an integer, got [{value}]") from None
    if number < minimum:
        raise BadRequest(f"[{name}] must be >= {minimum}, got [{number}]")
    return number


def _fields(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise BadRequest(f"[{name}] must be a field name or a list of field names")
    if not items or not all(items):
        raise BadRequest(f"[{name}] must not contain empty field names")
    return tuple(items)


def parse_overrides(headers: Mapping[str, str], body: dict[str, Any] | None) -> Overrides:
    """Options from the ``X-Rerank-*`` headers, then from the body's ``_rerank`` object (which wins)."""
    query = headers.get(HEADER_QUERY)
    fields = _fields(headers[HEADER_FIELD], HEADER_FIELD) if HEADER_FIELD in headers else None
    top_k = _int(headers[HEADER_TOP_K], HEADER_TOP_K, 1) if HEADER_TOP_K in headers else None
    enabled = _bool(headers[HEADER_ENABLED], HEADER_ENABLED) if HEADER_ENABLED in headers else None
    if query is not None:
        query = unquote(query)  # headers are latin-1 on the wire: non-ASCII text comes %-encoded
    raw = body.get(OVERRIDE_KEY) if body is not None else None
    if raw is not None:
        if not isinstance(raw, dict):
            raise BadRequest(f"[{OVERRIDE_KEY}] must be an object")
        unknown = set(raw) - {"query", "field", "top_k", "enabled", "relevant", "fusion"}
        if unknown:
            raise BadRequest(
                f"[{OVERRIDE_KEY}] unknown option [{sorted(unknown)[0]}]; "
                "expected query, field, top_k, enabled, relevant or fusion"
            )
        if "query" in raw:
            if not isinstance(raw["query"], str):
                raise BadRequest(f"[{OVERRIDE_KEY}.query] must be a string")
            query = raw["query"]
        if "field" in raw:
            fields = _fields(raw["field"], f"{OVERRIDE_KEY}.field")
        if "top_k" in raw:
            top_k = _int(raw["top_k"], f"{OVERRIDE_KEY}.top_k", 1)
        if "enabled" in raw:
            enabled = _bool(raw["enabled"], f"{OVERRIDE_KEY}.enabled")
        relevant = _relevant(raw["relevant"]) if "relevant" in raw else None
        fusion = _fusion_option(raw["fusion"]) if "fusion" in raw else None
    else:
        relevant, fusion = None, None
    if query is not None and not query.strip():
        raise BadRequest("the rerank query override must not be empty")
    return Overrides(query, fields, top_k, enabled, relevant, fusion)


def _fusion_option(value: Any) -> dict[str, Any]:
    """``"rrf"``, or ``{"mode": "linear", "weight": 0.3}`` (keys of ``rerank.fusion*``)."""
    name = f"{OVERRIDE_KEY}.fusion"
    spec = {"mode": value} if isinstance(value, str) else value
    if not isinstance(spec, dict) or not set(spec) <= {"mode", "k", "weight"}:
        raise BadRequest(f"[{name}] must be none, rrf, linear or an object of mode, k and weight")
    if "k" in spec:
        spec["k"] = _int(spec["k"], f"{name}.k", 1)
    if "weight" in spec and (
        isinstance(spec["weight"], bool) or not isinstance(spec["weight"], (int, float))
    ):
        raise BadRequest(f"[{name}.weight] must be a number between 0 and 1")
    try:
        Fusion(**{"mode": "none", **spec})
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"[{name}] {exc}") from None
    return dict(spec)


def fusion_of(cfg: RerankConfig, given: dict[str, Any] | None) -> Fusion:
    """The server's fusion settings, with what the request gave in place of them."""
    base = {"mode": cfg.fusion, "k": cfg.fusion_k, "weight": cfg.fusion_weight}
    return Fusion(**{**base, **(given or {})})


def _relevant(value: Any) -> dict[str, int]:
    """Judgements for online tracking: a list of relevant ``_id``s (grade 1), or ``{_id: grade}``."""
    name = f"{OVERRIDE_KEY}.relevant"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return dict.fromkeys(value, 1)
    if isinstance(value, dict) and all(
        isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in value.values()
    ):
        return {str(k): int(g) for k, g in value.items()}
    raise BadRequest(f"[{name}] must be a list of document ids or an object of id to grade (integer >= 0)")


def _stored_fields_hide_source(body: dict[str, Any], params: dict[str, str]) -> bool:
    """Elasticsearch returns no ``_source`` when ``stored_fields`` is given and ``_source`` is not
    asked for explicitly (checked against the server in the integration tests)."""
    stored = "stored_fields" in params or body.get("stored_fields") is not None
    explicit = body.get("_source") is not None or any(p in params for p in SOURCE_PARAMS)
    return stored and not explicit


def plan_request(
    params: Sequence[tuple[str, str]],
    body: dict[str, Any] | None,
    cfg: Config,
    overrides: Overrides,
    engine: Engine,
    indices: str | Sequence[str] | None,
) -> Passthrough | RerankPlan:
    """:func:`plan_search` under the rule the searched ``indices`` pick (:mod:`proxy.rules`): its
    settings and its model. The one place a search meets its rule, for every search API."""
    choice = choose(indices, cfg.rules, default_rule(cfg.rerank))
    if isinstance(choice, Mixed):
        return Passthrough(choice.reason)
    return plan_search(params, body, choice.rule.rerank, overrides, engine, choice.rule.model)


def plan_search(
    params: Sequence[tuple[str, str]],
    body: dict[str, Any] | None,
    cfg: RerankConfig,
    overrides: Overrides,
    engine: Engine = "elasticsearch",
    model: str = DEFAULT_MODEL,
) -> Passthrough | RerankPlan:
    """Rerank, or say why not. ``body`` is the parsed JSON body with the override key removed;
    ``cfg`` the search's effective settings and ``model`` the name of the model that will score it."""
    q = dict(params)
    src = body or {}
    if not cfg.enabled or overrides.enabled is False:  # a request can turn reranking off, never on
        return Passthrough("disabled")
    if "scroll" in q:
        return Passthrough("scroll")
    if src.get("search_after") is not None:
        return Passthrough("search_after")
    if src.get("pit") is not None:
        return Passthrough("pit")
    if q.get("stored_fields") == "_none_" or src.get("stored_fields") == "_none_":
        return Passthrough("no_source")
    try:
        size = _int(q["size"] if "size" in q else src.get("size", DEFAULT_SIZE), "size", 0)
        start = _int(q["from"] if "from" in q else src.get("from", 0), "from", 0)
    except BadRequest:  # Elasticsearch's options: it judges them, with its own error
        return Passthrough("invalid_request")
    if size == 0:
        return Passthrough("size_zero")
    # Any explicit sort, even on _score alone: its hits carry sort values that a search_after page
    # continues from, and no sort value Elasticsearch understands can express the model's order.
    if "sort" in q or src.get("sort") is not None:
        return Passthrough("sort")
    # min_score is a threshold on Elasticsearch's scores: model scores on another scale would come
    # back below it, and hits.total counts by Elasticsearch's scores anyway.
    if "min_score" in q or src.get("min_score") is not None:
        return Passthrough("min_score")

    query = overrides.query
    if query is None and cfg.query_path:
        query = text_at_path(src, cfg.query_path)
    if query is None and q.get("q"):
        query = lucene_to_text(q["q"]) or None
    if query is None and not q.get("q"):
        query = extract_query_text(src)
    if query is None:
        return Passthrough("no_query_text")

    top_k = overrides.top_k if overrides.top_k is not None else cfg.top_k
    if top_k > cfg.max_top_k:
        raise BadRequest(f"[top_k] must be <= {cfg.max_top_k} (rerank.max_top_k), got [{top_k}]")
    if start >= top_k:
        return Passthrough("window_beyond_top_k")
    fields = overrides.fields or cfg.field

    try:
        wanted = parse_source_filter(src.get("_source"), q)
    except SourceFilterError:
        return Passthrough("invalid_request")
    if _stored_fields_hide_source(src, q):
        wanted = SourceFilter(fetch=False)
    patch = plan_source(wanted, fields, engine)

    dropped = frozenset({"from", "size", "filter_path"} | (set(SOURCE_PARAMS) if patch else set()))
    upstream_body = dict(src)  # only top-level keys change: a shallow copy leaves the caller's intact
    upstream_body["from"] = 0
    upstream_body["size"] = max(top_k, start + size)
    if patch is not None:
        upstream_body["_source"] = patch.upstream.to_body()
    return RerankPlan(
        query,
        fields,
        top_k,
        start,
        size,
        dropped,
        upstream_body,
        patch,
        overrides.relevant,
        q.get("filter_path"),
        fusion_of(cfg, overrides.fusion),
        model,
    )
