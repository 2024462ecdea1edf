"""Finding the user's words in a search body: which clauses count, which are skipped."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.query_text import extract_query_text, lucene_to_text, text_at_path


def q(query: dict[str, Any]) -> str | None:
    return extract_query_text({"query": query})


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"match": {"title": "quick fox"}}, "quick fox"),
        ({"match": {"title": {"query": "quick fox", "operator": "and"}}}, "quick fox"),
        ({"match_phrase": {"body": "the lazy dog"}}, "the lazy dog"),
        ({"match_phrase_prefix": {"body": {"query": "lazy do"}}}, "lazy do"),
        ({"multi_match": {"query": "red shoes", "fields": ["title", "body"]}}, "red shoes"),
        ({"query_string": {"query": "title:(quick brown) AND fox~2"}}, "quick brown fox"),
        ({"simple_query_string": {"query": "hello world", "fields": ["t"]}}, "hello world"),
        ({"combined_fields": {"query": "open source", "fields": ["a", "b"]}}, "open source"),
        ({"match": {"title": "  spaced \n  out  "}}, "spaced out"),
    ],
)
def test_leaf_kinds(query: dict[str, Any], expected: str) -> None:
    assert q(query) == expected


@pytest.mark.parametrize(
    ("lucene", "expected"),
    [
        ("title:(quick brown) AND fox~2", "quick brown fox"),
        ('"hello world"^2 OR planet', "hello world planet"),
        ("body.en:cats && dogs || birds", "cats dogs birds"),
        ("roam~ NOT foam", "roam"),
        ("(a OR b) AND c", "a b c"),
        ("*", ""),
    ],
)
def test_lucene_to_text(lucene: str, expected: str) -> None:
    assert lucene_to_text(lucene) == expected


def test_bool_must_and_should_in_order_filter_and_must_not_ignored() -> None:
    query = {
        "bool": {
            "filter": [{"match": {"lang": "english"}}],
            "must": [{"match": {"title": "alpha"}}],
            "must_not": {"match": {"title": "omega"}},
            "should": [{"match_phrase": {"body": "beta gamma"}}],
        }
    }
    assert q(query) == "alpha beta gamma"


def test_nested_bool_inside_bool() -> None:
    query = {"bool": {"should": [{"bool": {"must": {"match": {"t": "deep"}}}}, {"term": {"id": 1}}]}}
    assert q(query) == "deep"


@pytest.mark.parametrize(
    "query",
    [
        {"function_score": {"query": {"match": {"t": "needle"}}, "functions": []}},
        {"constant_score": {"filter": {"match": {"t": "needle"}}}},
        {"boosting": {"positive": {"match": {"t": "needle"}}, "negative": {"match": {"t": "hay"}}}},
        {"dis_max": {"queries": [{"match": {"t": "needle"}}, {"term": {"t": "x"}}]}},
        {"nested": {"path": "c", "query": {"match": {"c.t": "needle"}}}},
    ],
)
def test_compound_queries(query: dict[str, Any]) -> None:
    assert q(query) == "needle"


def test_dis_max_joins_all_queries() -> None:
    assert q({"dis_max": {"queries": [{"match": {"a": "one"}}, {"match": {"b": "two"}}]}}) == "one two"


def test_duplicates_removed_keeping_first_position() -> None:
    query = {
        "bool": {
            "should": [
                {"match": {"title": "apple pie"}},
                {"match": {"body": "crust"}},
                {"match": {"body": " apple   pie "}},
            ]
        }
    }
    assert q(query) == "apple pie crust"


@pytest.mark.parametrize(
    "body",
    [
        {"query": {"match_all": {}}},
        {"query": {"term": {"status": "published"}}},
        {"query": {"bool": {"filter": {"match": {"t": "x"}}, "must_not": {"match": {"t": "y"}}}}},
        {"query": {"boosting": {"positive": {"term": {"a": 1}}, "negative": {"match": {"t": "no"}}}}},
        {"query": {"match": {"t": "   "}}},
        {"size": 3},
        {},
    ],
)
def test_no_text_is_none(body: dict[str, Any]) -> None:
    assert extract_query_text(body) is None


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("query.bool.must.0.match.title.query", "first"),
        ("query.bool.must.1.match.body", "second"),
        ("query.bool.must.2.match.body", None),  # index out of range
        ("query.bool.should.0", None),  # missing key
        ("query.bool.must.x", None),  # non-numeric index into a list
        ("query.bool.must.0.match.title", None),  # not a string
        ("query.bool.must.1.match.blank", None),  # whitespace only
        ("query.bool.must.1.match.body.deeper", None),  # through a string
    ],
)
def test_text_at_path(path: str, expected: str | None) -> None:
    body = {
        "query": {
            "bool": {
                "must": [
                    {"match": {"title": {"query": "first"}}},
                    {"match": {"body": "second", "blank": "  "}},
                ]
            }
        }
    }
    assert text_at_path(body, path) == expected


def test_text_at_path_list_index_is_ascii_digits() -> None:
    """``"²".isdigit()`` is true but ``int("²")`` fails: only ASCII digits index a list."""
    body = {"a": ["x"]}
    assert text_at_path(body, "a.²") is None
    assert text_at_path(body, "a.0") == "x"


def test_deeply_nested_query_keeps_document_order() -> None:
    query: Any = {"bool": {"must": [{"match": {"t": "one"}}], "should": {"match": {"t": "three"}}}}
    for _ in range(600):
        query = {"bool": {"must": [query, {"match": {"t": "two"}}]}}
    assert q(query) == "one three two"
