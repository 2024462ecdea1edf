"""Search templates: rendered by the cluster, then searched like any body.

The proxy cannot render mustache itself and must not guess: ``_render/template`` renders the client's
template with the client's credentials (one extra round trip, only for template searches), and the
rendered body goes through the search pipeline like a ``_search`` body. Whatever cannot be rendered, or
would mean something else as a ``_search``, goes up unchanged for the cluster to answer.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from multidict import CIMultiDict

from .upstream import Upstream, forwardable

_COMPAT = re.compile(r"compatible-with=(\d+)")
_TEMPLATE_KEYS = frozenset({"id", "source", "params", "explain", "profile"})
# URL parameters of _search/template that act on the search request itself and mean the same on the
# rewritten _search. Others (size, sort, _source...) are parsed by the template API and then replaced
# by the rendered body, whereas _search would apply them: such a request goes up as sent.
_TEMPLATE_PARAMS = frozenset(
    {
        "allow_no_indices", "allow_partial_search_results", "batched_reduce_size", "ccs_minimize_roundtrips",
        "expand_wildcards", "ignore_throttled", "ignore_unavailable", "max_concurrent_shard_requests",
        "pre_filter_shard_size", "preference", "request_cache", "rest_total_hits_as_int", "routing",
        "search_type", "typed_keys", "pretty", "human", "error_trace", "filter_path",
    }
)  # fmt: skip
TEMPLATE_FLAGS = ("explain", "profile")  # URL flags of the template API that belong in the body


def json_headers(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """Headers for a JSON request the proxy makes itself (template rendering) on the client's behalf."""
    out = forwardable(headers, drop=("Accept-Encoding", "Content-Type"))
    version = _COMPAT.search(headers.get("Accept", ""))
    out["Content-Type"] = (
        f"application/vnd.elasticsearch+json; compatible-with={version[1]}" if version else "application/json"
    )
    return out


def without_template(target: str) -> str:
    path, sep, query = target.partition("?")
    return path.rstrip("/").removesuffix("/template") + sep + query


def template_flags(params: Any) -> dict[str, bool] | None:
    """``explain``/``profile`` from a template request's URL, for the rendered body; None when the URL
    has a parameter the rewritten ``_search`` would read differently, or a flag that is not a boolean."""
    if not set(params) <= _TEMPLATE_PARAMS | set(TEMPLATE_FLAGS):
        return None
    flags: dict[str, bool] = {}
    for name in TEMPLATE_FLAGS:
        if name in params:
            if params[name] not in ("", "true", "false"):
                return None
            flags[name] = params[name] != "false"
    return flags


async def render(
    upstream: Upstream, headers: CIMultiDict[str], template: dict[str, Any]
) -> dict[str, Any] | None:
    """The search body a template renders to, rendered by Elasticsearch (``_render/template``), or
    None when it cannot be (no template engine, a missing template, an option ``_search/template``
    would refuse): the client's request then goes up unchanged."""
    if not set(template) <= _TEMPLATE_KEYS or not {"id", "source"} & set(template):
        return None
    spec = {k: template[k] for k in ("id", "source", "params") if k in template}
    resp = await upstream.request("POST", "/_render/template", json_headers(headers), orjson.dumps(spec))
    try:
        rendered = orjson.loads(resp.body).get("template_output") if resp.status == 200 else None
    except (orjson.JSONDecodeError, AttributeError):
        rendered = None
    if not isinstance(rendered, dict):
        return None
    for key in ("explain", "profile"):
        if key in template:
            rendered[key] = template[key]
    return rendered
