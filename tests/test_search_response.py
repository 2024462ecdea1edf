"""Cutting Elasticsearch's widened answer back to the client's window, in the reranked order."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from proxy.search_plan import RerankPlan
from proxy.search_response import apply_order, candidates, passage_text
from proxy.source_filter import SourceFilter, SourcePatch, plan_source


def make_plan(top_k: int, start: int, size: int, source: SourcePatch | None = None) -> RerankPlan:
    return RerankPlan("q", ("text",), top_k, start, size, frozenset({"from", "size"}), {}, source)


def response(n: int) -> dict[str, Any]:
    """n hits in Elasticsearch's order, ids h0..h{n-1}, descending ES scores."""
    hits = [{"_id": f"h{i}", "_score": float(100 - i), "_source": {"text": f"p{i}"}} for i in range(n)]
    return {
        "took": 7,
        "timed_out": False,
        "_shards": {"total": 2, "successful": 2, "skipped": 0, "failed": 0},
        "hits": {"total": {"value": 1234, "relation": "eq"}, "max_score": 100.0, "hits": hits},
        "aggregations": {"k": {"buckets": [{"key": "a", "doc_count": 3}]}},
    }


def ids(resp: dict[str, Any]) -> list[str]:
    return [h["_id"] for h in resp["hits"]["hits"]]


@pytest.mark.parametrize(
    ("source", "fields", "expected"),
    [
        ({"text": "hello"}, ("text",), "hello"),
        ({"a": {"b": "deep"}}, ("a.b",), "deep"),
        ({"tags": ["x", "y"]}, ("tags",), "x y"),
        ({"chunks": [{"t": "one"}, {"u": 0}, {"t": "two"}]}, ("chunks.t",), "one two"),
        ({"title": "T", "body": {"en": "B"}}, ("title", "body.en"), "T B"),
        ({"title": "T"}, ("missing", "title"), "T"),
        ({"n": 3, "f": True}, ("n", "f"), "3"),
        ({"text": "x"}, ("nope",), ""),
        ({"a": "str"}, ("a.b",), ""),
    ],
)
def test_passage_text(source: dict[str, Any], fields: tuple[str, ...], expected: str) -> None:
    assert passage_text({"_source": source}, fields) == expected


def test_passage_text_without_source() -> None:
    assert passage_text({"_id": "1"}, ("text",)) == ""


def test_candidates_are_the_top_k_in_es_order() -> None:
    assert candidates(response(6), make_plan(top_k=4, start=0, size=10)) == ["p0", "p1", "p2", "p3"]


def test_reranks_top_k_and_keeps_everything_else() -> None:
    resp = response(5)
    untouched = {k: copy.deepcopy(v) for k, v in resp.items() if k != "hits"}
    total = copy.deepcopy(resp["hits"]["total"])
    out = apply_order(resp, make_plan(top_k=5, start=0, size=5), [0.1, 0.9, 0.5, 0.9, -1.0])
    assert out is resp
    assert ids(out) == ["h1", "h3", "h2", "h0", "h4"]  # h1 and h3 tie: ES order kept
    assert [h["_score"] for h in out["hits"]["hits"]] == [0.9, 0.9, 0.5, 0.1, -1.0]
    assert all(type(h["_score"]) is float for h in out["hits"]["hits"])
    assert out["hits"]["max_score"] == 0.9
    assert out["hits"]["total"] == total
    assert {k: v for k, v in out.items() if k != "hits"} == untouched


def test_window_is_sliced_after_reranking() -> None:
    out = apply_order(response(6), make_plan(top_k=6, start=2, size=3), [1, 2, 3, 4, 5, 6])
    assert ids(out) == ["h3", "h2", "h1"]


def test_hits_past_top_k_follow_in_es_order_unscored() -> None:
    """Elasticsearch's scores of the tail would exceed the model's above them (and max_score): the
    tail keeps its order with ``_score: null``, as Elasticsearch writes hits it did not score."""
    resp = response(6)
    out = apply_order(resp, make_plan(top_k=3, start=1, size=4), [0.0, 1.0, 2.0])
    assert ids(out) == ["h1", "h0", "h3", "h4"]
    assert [h["_score"] for h in out["hits"]["hits"]] == [1.0, 0.0, None, None]
    assert out["hits"]["max_score"] == 2.0


def test_hits_without_passage_text_come_after_the_scored_ones() -> None:
    """A hit the model could not read (None) is never placed by a made-up score: scored hits first,
    then unscored head hits in Elasticsearch's order, then the tail."""
    out = apply_order(response(6), make_plan(top_k=4, start=0, size=6), [None, 1.0, None, 3.0])
    assert ids(out) == ["h3", "h1", "h0", "h2", "h4", "h5"]
    assert [h["_score"] for h in out["hits"]["hits"]] == [3.0, 1.0, None, None, None, None]
    assert out["hits"]["max_score"] == 3.0


def test_fewer_hits_than_top_k() -> None:
    out = apply_order(response(2), make_plan(top_k=10, start=0, size=10), [1.0, 2.0])
    assert ids(out) == ["h1", "h0"]


def test_no_scores_keeps_es_order_but_slices() -> None:
    out = apply_order(response(6), make_plan(top_k=4, start=1, size=2), None)
    assert ids(out) == ["h1", "h2"]
    assert [h["_score"] for h in out["hits"]["hits"]] == [99.0, 98.0]
    assert out["hits"]["max_score"] == 100.0


def test_wrong_score_count_raises() -> None:
    with pytest.raises(ValueError, match="2 scores for 3 hits"):
        apply_order(response(3), make_plan(top_k=3, start=0, size=3), [1.0, 2.0])


def test_empty_hits() -> None:
    resp = response(0)
    resp["hits"]["max_score"] = None
    out = apply_order(resp, make_plan(top_k=3, start=0, size=3), [])
    assert out["hits"]["hits"] == []
    assert out["hits"]["max_score"] is None


def test_response_without_hits_is_returned_unchanged() -> None:
    resp: dict[str, Any] = {"error": {"type": "x"}, "status": 500}
    assert apply_order(resp, make_plan(top_k=3, start=0, size=3), [1.0]) == {
        "error": {"type": "x"},
        "status": 500,
    }


def test_source_restored_on_window() -> None:
    patch = plan_source(SourceFilter(includes=("title",)), ("text",))
    assert patch is not None
    resp = response(3)
    for i, hit in enumerate(resp["hits"]["hits"]):
        hit["_source"]["title"] = f"T{i}"
    out = apply_order(resp, make_plan(top_k=3, start=0, size=2, source=patch), [0.0, 0.0, 5.0])
    assert out["hits"]["hits"] == [
        {"_id": "h2", "_score": 5.0, "_source": {"title": "T2"}},
        {"_id": "h0", "_score": 0.0, "_source": {"title": "T0"}},
    ]


def test_source_false_removes_source() -> None:
    patch = plan_source(SourceFilter(fetch=False), ("text",))
    out = apply_order(response(2), make_plan(top_k=2, start=0, size=2, source=patch), [0.0, 1.0])
    assert out["hits"]["hits"] == [{"_id": "h1", "_score": 1.0}, {"_id": "h0", "_score": 0.0}]
