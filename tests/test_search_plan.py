"""Rerank-or-passthrough decisions and the widened upstream request, without a server."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest

from proxy.config import RerankConfig
from proxy.errors import BadRequest
from proxy.fusion import Fusion
from proxy.search_plan import (
    MSEARCH,
    MSEARCH_TEMPLATE,
    SEARCH,
    TEMPLATE,
    Overrides,
    Passthrough,
    RerankPlan,
    is_search_path,
    parse_overrides,
    plan_search,
    search_endpoint,
)
from proxy.source_filter import SourceFilter

CFG = RerankConfig(top_k=20, max_top_k=50)
MATCH = {"query": {"match": {"text": "red fox"}}}


def plan(
    body: dict[str, Any] | None = None,
    params: dict[str, str] | None = None,
    cfg: RerankConfig = CFG,
    overrides: Overrides | None = None,
) -> Passthrough | RerankPlan:
    return plan_search(list((params or {}).items()), body, cfg, overrides or Overrides())


def rerank(*args: Any, **kwargs: Any) -> RerankPlan:
    result = plan(*args, **kwargs)
    assert isinstance(result, RerankPlan), result
    return result


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/_search", SEARCH),
        ("POST", "/_search", SEARCH),
        ("GET", "/idx/_search", SEARCH),
        ("GET", "/a,b/_search", SEARCH),
        ("POST", "/logs-*/_search", SEARCH),
        ("GET", "/idx/_search/", SEARCH),
        ("GET", "/_all/_search", SEARCH),
        ("GET", "/_msearch", MSEARCH),
        ("POST", "/idx/_msearch", MSEARCH),
        ("GET", "/idx/_search/template", TEMPLATE),
        ("POST", "/_search/template", TEMPLATE),
        ("POST", "/_msearch/template", MSEARCH_TEMPLATE),
        ("GET", "/a,b/_msearch/template", MSEARCH_TEMPLATE),
        ("GET", "/_search/scroll", None),
        ("GET", "/_render/template", None),
        ("GET", "/idx/_doc/1", None),
        ("GET", "/idx/_count", None),
        ("GET", "/a/b/_search", None),
        ("PUT", "/idx/_search", None),
        ("DELETE", "/_search", None),
        ("PUT", "/_msearch", None),
    ],
)
def test_search_endpoint(method: str, path: str, expected: str | None) -> None:
    assert search_endpoint(method, path) == expected
    assert is_search_path(method, path) is (expected is not None)


@pytest.mark.parametrize(
    ("body", "params", "cfg", "overrides", "reason"),
    [
        (MATCH, {}, replace(CFG, enabled=False), Overrides(), "disabled"),
        (MATCH, {}, replace(CFG, enabled=False), Overrides(enabled=True), "disabled"),
        (MATCH, {}, CFG, Overrides(enabled=False), "disabled"),
        (MATCH, {"scroll": "1m"}, CFG, Overrides(), "scroll"),
        ({**MATCH, "search_after": [1.0, "x"]}, {}, CFG, Overrides(), "search_after"),
        ({**MATCH, "pit": {"id": "abc"}}, {}, CFG, Overrides(), "pit"),
        (MATCH, {"size": "0"}, CFG, Overrides(), "size_zero"),
        ({**MATCH, "size": 0}, {}, CFG, Overrides(), "size_zero"),
        (MATCH, {"sort": "date:desc"}, CFG, Overrides(), "sort"),
        (MATCH, {"sort": "_score:desc,date:asc"}, CFG, Overrides(), "sort"),
        (MATCH, {"sort": "_score:asc"}, CFG, Overrides(), "sort"),
        ({**MATCH, "sort": "date"}, {}, CFG, Overrides(), "sort"),
        ({**MATCH, "sort": ["date"]}, {}, CFG, Overrides(), "sort"),
        ({**MATCH, "sort": [{"date": "desc"}]}, {}, CFG, Overrides(), "sort"),
        ({**MATCH, "sort": [{"_score": "asc"}]}, {}, CFG, Overrides(), "sort"),
        ({**MATCH, "sort": [{"_score": {"order": "asc"}}]}, {}, CFG, Overrides(), "sort"),
        ({**MATCH, "sort": ["_score", "date"]}, {}, CFG, Overrides(), "sort"),
        ({"query": {"term": {"status": "x"}}}, {}, CFG, Overrides(), "no_query_text"),
        (None, {}, CFG, Overrides(), "no_query_text"),
        (None, {"q": "*"}, CFG, Overrides(), "no_query_text"),
        ({**MATCH, "from": 20}, {}, CFG, Overrides(), "window_beyond_top_k"),
        (MATCH, {"from": "5"}, CFG, Overrides(top_k=5), "window_beyond_top_k"),
    ],
)
def test_passthrough_reasons(
    body: dict[str, Any] | None,
    params: dict[str, str],
    cfg: RerankConfig,
    overrides: Overrides,
    reason: str,
) -> None:
    assert plan(body, params, cfg, overrides) == Passthrough(reason)


@pytest.mark.parametrize(
    ("body", "params"),
    [
        ({**MATCH, "sort": "_score"}, {}),
        ({**MATCH, "sort": ["_score"]}, {}),
        ({**MATCH, "sort": [{"_score": "desc"}]}, {}),
        ({**MATCH, "sort": {"_score": {"order": "desc"}}}, {}),
        (MATCH, {"sort": "_score"}),
        (MATCH, {"sort": "_score:desc"}),
    ],
)
def test_score_sorts_are_passed_through(body: dict[str, Any], params: dict[str, str]) -> None:
    """An explicit sort, even on _score alone, gives hits sort values a search_after page continues
    from; the model's order cannot be written as one, so such a search is not reranked."""
    assert plan(body, params) == Passthrough("sort")


@pytest.mark.parametrize(
    ("body", "params"),
    [({**MATCH, "min_score": 0.5}, {}), ({**MATCH, "min_score": 0}, {}), (MATCH, {"min_score": "1"})],
)
def test_min_score_is_passed_through(body: dict[str, Any], params: dict[str, str]) -> None:
    """min_score thresholds Elasticsearch's scores; model scores would come back below it."""
    assert plan(body, params) == Passthrough("min_score")


def test_null_sort_and_min_score_are_absent() -> None:
    assert rerank({**MATCH, "sort": None, "min_score": None}).query == "red fox"


@pytest.mark.parametrize(
    ("body", "params"),
    [
        ({**MATCH, "stored_fields": []}, {}),
        ({**MATCH, "stored_fields": ["title"]}, {}),
        (MATCH, {"stored_fields": "title"}),
    ],
)
def test_stored_fields_without_source_fetch_the_passage(body: dict[str, Any], params: dict[str, str]) -> None:
    """stored_fields without an explicit _source returns no _source: the passage must be asked for
    and removed again, or every hit would be scored on empty text."""
    p = rerank(body, params)
    assert p.source is not None and not p.source.original.fetch
    assert p.source.upstream.fetch and p.source.upstream.includes == ("text",)
    assert "_source" in p.body


def test_stored_fields_with_explicit_source_keep_it() -> None:
    p = rerank({**MATCH, "stored_fields": ["title"], "_source": True})
    assert p.source is None and "_source" in p.body


def test_upstream_body_window_and_dropped_params() -> None:
    body = {**MATCH, "from": 5, "size": 10, "aggs": {"n": {"terms": {"field": "k"}}}}
    before = copy.deepcopy(body)
    p = rerank(body)
    assert body == before  # the caller's body is not mutated
    assert (p.top_k, p.start, p.size, p.fields, p.source) == (20, 5, 10, ("text",), None)
    assert p.body == {**before, "from": 0, "size": 20}
    assert p.dropped_params == frozenset({"from", "size", "filter_path"})


def test_upstream_size_covers_window_past_top_k() -> None:
    p = rerank({**MATCH, "from": 15, "size": 10})
    assert p.body["size"] == 25
    assert p.body["from"] == 0


def test_default_size_is_ten() -> None:
    p = rerank(MATCH)
    assert (p.start, p.size) == (0, 10)


def test_url_from_size_win_over_body() -> None:
    p = rerank({**MATCH, "from": 1, "size": 2}, {"from": "3", "size": "30"})
    assert (p.start, p.size) == (3, 30)
    assert p.body["size"] == 33
    assert plan({**MATCH, "size": 0}, {"size": "5"}) != Passthrough("size_zero")
    assert plan({**MATCH, "size": 5}, {"size": "0"}) == Passthrough("size_zero")


@pytest.mark.parametrize(
    ("body", "params"),
    [
        ({**MATCH, "size": -1}, {}),
        (MATCH, {"from": "-2"}),
        (MATCH, {"size": "ten"}),
        ({**MATCH, "from": True}, {}),
    ],
)
def test_bad_from_size_is_left_to_elasticsearch(body: dict[str, Any], params: dict[str, str]) -> None:
    """Elasticsearch's own options are judged by Elasticsearch, which answers with its own error."""
    assert plan(body, params) == Passthrough("invalid_request")


def test_source_patch_and_dropped_source_params() -> None:
    p = rerank({**MATCH, "_source": ["title"]}, {"_source_excludes": "text"})
    assert p.source is not None
    assert p.source.original == SourceFilter(includes=(), excludes=("text",))
    assert p.body["_source"] is True  # the URL's filter replaced the body's: widened, it fetches all
    assert p.dropped_params == frozenset(
        {"from", "size", "filter_path", "_source", "_source_includes", "_source_excludes"}
    )
    q = rerank({**MATCH, "_source": False})
    assert q.body["_source"] == {"includes": ["text"]}
    assert "_source" in q.dropped_params


def test_bad_source_is_left_to_elasticsearch() -> None:
    assert plan({**MATCH, "_source": 5}) == Passthrough("invalid_request")


def test_q_param_uses_lucene_text_and_ignores_body_query() -> None:
    p = rerank({"query": {"match": {"text": "body words"}}}, {"q": "title:(quick brown) AND fox~2"})
    assert p.query == "quick brown fox"
    assert plan({"query": {"match": {"text": "body words"}}}, {"q": "*"}) == Passthrough("no_query_text")


def test_query_path_config() -> None:
    cfg = replace(CFG, query_path="query.bool.must.0.match.title.query")
    body = {
        "query": {
            "bool": {
                "must": [{"match": {"title": {"query": "chosen"}}}],
                "should": [{"match": {"body": "ignored"}}],
            }
        }
    }
    assert rerank(body, cfg=cfg).query == "chosen"
    assert rerank(body).query == "chosen ignored"
    # a path that is not in the body falls back to the DSL
    missing = replace(CFG, query_path="query.nope")
    assert rerank(body, cfg=missing).query == "chosen ignored"


def test_overrides_apply() -> None:
    p = rerank(MATCH, overrides=Overrides(query="typed", fields=("a.b", "c"), top_k=40))
    assert (p.query, p.fields, p.top_k, p.body["size"]) == ("typed", ("a.b", "c"), 40, 40)
    assert rerank(None, overrides=Overrides(query="only override")).query == "only override"


def test_top_k_above_max_is_bad_request() -> None:
    with pytest.raises(BadRequest, match="max_top_k"):
        plan(MATCH, overrides=Overrides(top_k=51))
    assert rerank(MATCH, overrides=Overrides(top_k=50)).top_k == 50


def test_overrides_from_headers() -> None:
    headers = {
        "X-Rerank-Query": "caf%C3%A9%20cr%C3%A8me",
        "X-Rerank-Field": "title, body.text",
        "X-Rerank-Top-K": "7",
        "X-Rerank-Enabled": "off",
    }
    assert parse_overrides(headers, None) == Overrides("café crème", ("title", "body.text"), 7, False)
    assert parse_overrides({}, {"query": {}}) == Overrides()
    assert parse_overrides({"X-Rerank-Enabled": "TRUE"}, None).enabled is True


def test_body_overrides_win_over_headers() -> None:
    headers = {"X-Rerank-Query": "header", "X-Rerank-Field": "h", "X-Rerank-Top-K": "3"}
    body = {"_rerank": {"query": "body", "field": ["b1", "b2"], "top_k": 9, "enabled": False}}
    assert parse_overrides(headers, body) == Overrides("body", ("b1", "b2"), 9, False)
    partial = parse_overrides(headers, {"_rerank": {"top_k": 4}})
    assert partial == Overrides("header", ("h",), 4, None)


@pytest.mark.parametrize(
    ("headers", "body", "name"),
    [
        ({"X-Rerank-Top-K": "many"}, None, "X-Rerank-Top-K"),
        ({"X-Rerank-Top-K": "0"}, None, "X-Rerank-Top-K"),
        ({"X-Rerank-Enabled": "maybe"}, None, "X-Rerank-Enabled"),
        ({"X-Rerank-Field": "a,,b"}, None, "X-Rerank-Field"),
        ({"X-Rerank-Query": "   "}, None, "query"),
        ({}, {"_rerank": "on"}, "_rerank"),
        ({}, {"_rerank": {"topk": 3}}, "topk"),
        ({}, {"_rerank": {"top_k": "x"}}, "_rerank.top_k"),
        ({}, {"_rerank": {"top_k": True}}, "_rerank.top_k"),
        ({}, {"_rerank": {"top_k": -1}}, "_rerank.top_k"),
        ({}, {"_rerank": {"enabled": "perhaps"}}, "_rerank.enabled"),
        ({}, {"_rerank": {"enabled": 1}}, "_rerank.enabled"),
        ({}, {"_rerank": {"field": 3}}, "_rerank.field"),
        ({}, {"_rerank": {"field": []}}, "_rerank.field"),
        ({}, {"_rerank": {"query": 3}}, "_rerank.query"),
        ({}, {"_rerank": {"query": ""}}, "query"),
    ],
)
def test_bad_overrides(headers: dict[str, str], body: dict[str, Any] | None, name: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_overrides(headers, body)
    assert name in info.value.reason
    assert info.value.status == 400


def test_filter_path_is_applied_by_the_proxy() -> None:
    """The proxy needs the hits a filter would remove: it drops filter_path upstream and keeps it."""
    p = rerank(MATCH, {"filter_path": "hits.hits._id,-took"})
    assert p.filter_path == "hits.hits._id,-took"
    assert "filter_path" in p.dropped_params


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("rrf", Fusion("rrf", 60, 0.5)),
        ({"mode": "linear", "weight": 0.3}, Fusion("linear", 60, 0.3)),
        ({"k": 10}, Fusion("none", 10, 0.5)),
    ],
)
def test_fusion_per_request_over_the_servers(option: Any, expected: Fusion) -> None:
    overrides = parse_overrides({}, {"_rerank": {"fusion": option}})
    assert rerank(MATCH, overrides=overrides).fusion == expected
    assert rerank(MATCH).fusion == Fusion()  # the server's: rerank.fusion, none by default


@pytest.mark.parametrize(
    "option", ["max", {"mode": "rrf", "k": 0}, {"weight": 2}, {"weight": "x"}, {"w": 1}, 3]
)
def test_bad_fusion_option(option: Any) -> None:
    with pytest.raises(BadRequest, match=r"_rerank\.fusion"):
        parse_overrides({}, {"_rerank": {"fusion": option}})
