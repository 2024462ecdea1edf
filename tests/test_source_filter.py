"""Widening ``_source`` for the passage field, and cutting each hit back to the client's filter."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from proxy.source_filter import (
    SourceFilter,
    SourceFilterError,
    matches,
    parse_source_filter,
    plan_source,
    restore_hit,
    restore_hits,
)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (None, SourceFilter()),
        (True, SourceFilter()),
        (False, SourceFilter(fetch=False)),
        ("title", SourceFilter(includes=("title",))),
        ("a,b", SourceFilter(includes=("a,b",))),  # the body never splits on commas
        (["title", "a.*"], SourceFilter(includes=("title", "a.*"))),
        ({"includes": ["a"], "excludes": ["b"]}, SourceFilter(includes=("a",), excludes=("b",))),
        ({"include": "a", "exclude": ["b", "c"]}, SourceFilter(includes=("a",), excludes=("b", "c"))),
        ({"excludes": "secret"}, SourceFilter(excludes=("secret",))),
        ({}, SourceFilter()),
    ],
)
def test_parse_body_forms(body: Any, expected: SourceFilter) -> None:
    assert parse_source_filter(body, {}) == expected


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"_source": "false"}, SourceFilter(fetch=False)),
        ({"_source": "true"}, SourceFilter()),
        ({"_source": "a,b"}, SourceFilter(includes=("a", "b"))),
        ({"_source_includes": "a,,b"}, SourceFilter(includes=("a", "b"))),
        ({"_source_excludes": "x,y"}, SourceFilter(excludes=("x", "y"))),
        ({"_source": "a", "_source_includes": "b"}, SourceFilter(includes=("a", "b"))),
    ],
)
def test_url_params_replace_body(params: dict[str, str], expected: SourceFilter) -> None:
    body = {"includes": ["body_inc"], "excludes": ["body_exc"]}
    assert parse_source_filter(body, params) == expected
    assert parse_source_filter(False, params) == expected


@pytest.mark.parametrize("body", [3, {"includes": 3}, {"excludes": ["a", 1]}, [1]])
def test_parse_rejects_bad_shapes(body: Any) -> None:
    with pytest.raises(SourceFilterError):
        parse_source_filter(body, {})


@pytest.mark.parametrize(
    ("path", "pattern", "expected"),
    [
        ("text", "text", True),
        ("text", "tex", False),
        ("text", "t*", True),
        ("a.b.c", "a*", True),  # * spans dots
        ("a.b.c", "*c", True),
        ("a.b.c", "a.*.c", True),
        ("a.b", "a", True),  # the parent object covers its children
        ("a.b.c", "a.b", True),
        ("a", "a.b", False),  # a child pattern does not cover the parent
        ("ab", "a", False),
        ("xabxa", "*a*b*", True),  # several wildcards: any split works
        ("abcbd", "a*b*c*d", True),
        ("a", "?", False),  # only * is a wildcard in Elasticsearch
        ("ab", "[ab]b", False),
    ],
)
def test_matches(path: str, pattern: str, expected: bool) -> None:
    assert matches(path, pattern) is expected


@pytest.mark.parametrize(
    "flt",
    [
        SourceFilter(),
        SourceFilter(includes=("text", "a.b")),
        SourceFilter(includes=("te*", "a.*")),
        SourceFilter(includes=("text", "a")),  # "a" covers "a.b"
        SourceFilter(excludes=("title", "a.c")),
    ],
)
def test_plan_none_when_field_already_returned(flt: SourceFilter) -> None:
    assert plan_source(flt, ("text", "a.b")) is None


def test_plan_source_false() -> None:
    patch = plan_source(SourceFilter(fetch=False), ("text",))
    assert patch is not None
    assert patch.upstream == SourceFilter(includes=("text",))
    hit = {"_id": "1", "_source": {"text": "passage"}}
    restore_hit(hit, patch)
    assert hit == {"_id": "1"}


def test_plan_includes_without_field() -> None:
    patch = plan_source(SourceFilter(includes=("title",), excludes=("body",)), ("text",))
    assert patch is not None
    assert patch.upstream == SourceFilter(includes=("title", "text"), excludes=("body",))
    assert patch.dropped_excludes == ()
    hit = {"_source": {"title": "T", "text": "passage"}}
    restore_hit(hit, patch)
    assert hit == {"_source": {"title": "T"}}


def test_wildcard_exclude_removes_every_match_after_restore() -> None:
    patch = plan_source(SourceFilter(excludes=("t*", "secret")), ("text",))
    assert patch is not None
    assert patch.upstream == SourceFilter(excludes=("secret",))
    assert patch.dropped_excludes == ("t*",)
    hit = {"_source": {"text": "p", "title": "T", "tags": ["x"], "body": "B"}}
    restore_hit(hit, patch)
    assert hit == {"_source": {"body": "B"}}  # what Elasticsearch returns for excludes ["t*", "secret"]


def test_exact_exclude_of_field() -> None:
    patch = plan_source(SourceFilter(excludes=("text",)), ("text",))
    assert patch is not None
    hit = {"_source": {"text": "p", "title": "T"}}
    restore_hit(hit, patch)
    assert hit == {"_source": {"title": "T"}}


def test_exclude_of_parent_object_removes_siblings_too() -> None:
    patch = plan_source(SourceFilter(excludes=("a",)), ("a.b",))
    assert patch is not None
    hit = {"_source": {"a": {"b": "p", "c": 1}, "d": 2}}
    restore_hit(hit, patch)
    assert hit == {"_source": {"d": 2}}


def test_nested_field_with_sibling_include() -> None:
    patch = plan_source(SourceFilter(includes=("a.c",)), ("a.b",))
    assert patch is not None
    assert patch.upstream.includes == ("a.c", "a.b")
    hit = {"_source": {"a": {"b": "p", "c": 1}}}
    restore_hit(hit, patch)
    assert hit == {"_source": {"a": {"c": 1}}}


def test_include_missing_field_leaves_no_empty_parent() -> None:
    patch = plan_source(SourceFilter(includes=("x",)), ("a.b",))
    assert patch is not None
    hit = {"_source": {"a": {"b": "p"}}}
    restore_hit(hit, patch)
    assert hit == {"_source": {}}


def test_field_inside_list_of_objects() -> None:
    patch = plan_source(SourceFilter(excludes=("chunks.text",)), ("chunks.text",))
    assert patch is not None
    hit = {"_source": {"chunks": [{"text": "p1", "n": 1}, {"text": "p2", "n": 2}]}}
    restore_hit(hit, patch)
    assert hit == {"_source": {"chunks": [{"n": 1}, {"n": 2}]}}


def test_restore_hits_none_patch_and_hit_without_source() -> None:
    hits = [{"_id": "1", "_source": {"text": "p"}}]
    before = copy.deepcopy(hits)
    restore_hits(hits, None)
    assert hits == before
    patch = plan_source(SourceFilter(fetch=False), ("text",))
    bare = {"_id": "2"}
    restore_hits([bare], patch)
    assert bare == {"_id": "2"}
