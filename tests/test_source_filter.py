"""Reading ``_source`` like Elasticsearch, widening it for the passage field without new warnings, and
cutting each hit back to the client's filter. Expected values here were first taken from a real
Elasticsearch 8.19 (and OpenSearch 3.8 where named); ``test_source_filter_server.py`` keeps checking
them against the servers."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from proxy.source_filter import (
    SourceFilter,
    SourceFilterError,
    Spelling,
    parse_source_filter,
    plan_source,
    restore_hit,
    restore_hits,
)
from proxy.source_semantics import filter_source, names_path


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
        ({"include": ["a"], "includes": ["b"]}, SourceFilter(includes=("b",))),  # the last key wins
        ({"includes": ["b"], "include": ["a"]}, SourceFilter(includes=("a",))),
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
        ({"_source": ""}, SourceFilter()),
        ({"_source": "a,b"}, SourceFilter(includes=("a", "b"))),
        # Only "true" and "false" are booleans: anything else is a field pattern.
        ({"_source": "1"}, SourceFilter(includes=("1",))),
        ({"_source": "no"}, SourceFilter(includes=("no",))),
        ({"_source": "FALSE"}, SourceFilter(includes=("FALSE",))),
        # _source_includes replaces the includes _source gave, whatever the order.
        ({"_source": "a", "_source_includes": "b"}, SourceFilter(includes=("b",))),
        ({"_source_includes": "b", "_source": "a"}, SourceFilter(includes=("b",))),
        ({"_source": "a", "_source_includes": ""}, SourceFilter()),
        ({"_source": "false", "_source_includes": "b"}, SourceFilter(fetch=False, includes=("b",))),
        # Java's String.split: empty entries stay, trailing ones go.
        ({"_source_includes": "a,,b"}, SourceFilter(includes=("a", "", "b"))),
        ({"_source": ",a,"}, SourceFilter(includes=("", "a"))),
        ({"_source": ","}, SourceFilter()),
        ({"_source": " "}, SourceFilter(includes=(" ",))),  # a blank pattern: nothing is returned
        ({"_source_excludes": "x,y"}, SourceFilter(excludes=("x", "y"))),
    ],
)
def test_url_params_replace_body(params: dict[str, str], expected: SourceFilter) -> None:
    body = {"includes": ["body_inc"], "excludes": ["body_exc"]}
    assert parse_source_filter(body, params) == expected
    assert parse_source_filter(False, params) == expected


@pytest.mark.parametrize(
    "body",
    [
        3,
        {"includes": 3},
        {"includes": None},
        {"excludes": ["a", 1]},
        {"bogus": ["a"]},
        {"exclude_vectors": True},  # Elasticsearch 8.19+: vector fields go by rules of their own
        [None],
        [["a"]],
        [{}],
        [1, True],  # Elasticsearch takes them as "1" and "true", OpenSearch 3 refuses them
    ],
)
def test_parse_rejects_bad_shapes(body: Any) -> None:
    with pytest.raises(SourceFilterError):
        parse_source_filter(body, {})
    with pytest.raises(SourceFilterError):  # the body is read even when the URL overrides it
        parse_source_filter(body, {"_source": "title"})


@pytest.mark.parametrize(
    ("body", "spelling"),
    [
        ("a", Spelling("string")),
        (["a"], Spelling("list")),
        (False, Spelling("bool")),
        (
            {"include": "a", "excludes": []},
            Spelling("object", (("include", "string"), ("excludes", "empty"))),
        ),
    ],
)
def test_spelling_is_recorded(body: Any, spelling: Spelling) -> None:
    assert parse_source_filter(body, {}).spelling == spelling
    url = parse_source_filter(body, {"_source_excludes": "x"}).spelling
    assert url == (spelling if spelling.shape == "object" else Spelling())


@pytest.mark.parametrize(
    ("client", "fields", "widened"),
    [
        # The deprecated key stays (Elasticsearch's warning with it), with the client's value shape.
        ({"include": ["title"]}, ("text",), {"include": ["title", "text"]}),
        (
            {"include": "title", "exclude": "body"},
            ("text",),
            {"include": ["title", "text"], "exclude": "body"},
        ),
        # An emptied key keeps its place with a pattern that selects no field: an empty array, or an
        # object without patterns, would draw OpenSearch 3's deprecation warnings.
        ({"exclude": "text"}, ("text",), {"exclude": ""}),
        ({"excludes": ["text"]}, ("text",), {"excludes": [""]}),
        ({"exclude": ["text"], "includes": [""]}, ("text",), {"exclude": [" "], "includes": ["", "text"]}),
        ({"include": ["title"], "includes": ["title"], "exclude": ["text"]}, ("text",), None),
        # An empty array the client sent itself stays.
        ({"includes": [], "excludes": ["text", "x"]}, ("text",), {"includes": [], "excludes": ["x"]}),
        ({"includes": ["title"], "excludes": []}, ("text",), {"includes": ["title", "text"], "excludes": []}),
        ("title", ("text",), ["title", "text"]),
        ([""], ("text",), ["", "text"]),
        (False, ("text",), {"includes": ["text"]}),
        # Excludes with "*" are filtered the map way; dropping the last one would change the way.
        ({"excludes": ["t*", "body"]}, ("text",), {"excludes": [""]}),
        ({"excludes": ["t*", "b*"]}, ("text",), {"excludes": ["b*"]}),
        # A pattern both included and excluded stays refusable by OpenSearch 3.
        (
            {"includes": ["text"], "excludes": ["text"]},
            ("text",),
            {"includes": ["text", ""], "excludes": [""]},
        ),
    ],
)
def test_widened_body_keeps_the_clients_spelling(client: Any, fields: tuple[str, ...], widened: Any) -> None:
    patch = plan_source(parse_source_filter(client, {}), fields)
    assert patch is not None
    body = patch.upstream.to_body()
    if widened is None:  # both spellings of a key: each carries the widened value
        assert body == {"include": ["title", "text"], "includes": ["title", "text"], "exclude": [""]}
    else:
        assert body == widened


def test_url_filter_widened_in_the_body_keeps_the_bodys_deprecated_key() -> None:
    """Elasticsearch parses (and warns about) the body's ``_source`` before the URL replaces it."""
    flt = parse_source_filter({"include": ["title"]}, {"_source_excludes": "text,x"})
    patch = plan_source(flt, ("text",))
    assert patch is not None
    assert patch.upstream.to_body() == {"include": ["*"], "excludes": ["x"]}
    bare = plan_source(parse_source_filter(None, {"_source_excludes": "text"}), ("text",))
    assert bare is not None and bare.upstream.to_body() is True


@pytest.mark.parametrize(
    ("path", "patterns", "by_map", "expected"),
    [
        ("text", ["text"], False, True),
        ("text", ["tex"], False, False),
        ("text", ["t*"], False, True),
        ("a.b", ["a"], False, True),  # the object covers its children
        ("a", ["a.b"], False, False),
        ("a.b.c", ["a.*.c"], False, True),
        ("a.b.c", ["*c"], False, False),  # path filtering: * stays within one level
        ("a.b.c", ["*c"], True, True),  # map filtering: * spans dots
        ("a.b.c", ["a*"], False, True),  # names the object a
        ("a.b.c", ["**.c"], False, True),
        ("a.c", ["a.**.c"], False, False),  # ** is one level or more
        ("text", [" text "], False, True),  # path filtering trims patterns
        ("text", [" text "], True, False),  # map filtering does not
        ("a", ["?"], True, False),  # only * is a wildcard
        ("ab", ["[ab]b"], True, False),
    ],
)
def test_names_path(path: str, patterns: list[str], by_map: bool, expected: bool) -> None:
    assert names_path(patterns, path, by_map) is expected


DOC = {"o": {}, "l": [], "arr": [{"x": 1, "y": 2}, {"y": 3}], "lo": [{}, {"x": 1}, 3], "a": {"b": 1, "c": 2}}
UNTOUCHED = {"o": {}, "l": [], "lo": [{}, {"x": 1}, 3], "a": {"b": 1, "c": 2}}


@pytest.mark.parametrize(
    ("includes", "excludes", "expected"),
    [
        # Path filtering (no * in the excludes): whatever the filtering empties goes, while objects
        # and arrays that were empty already survive the excludes.
        (["a"], ["a.b", "a.c"], {}),
        ([], ["arr.x", "arr.y"], UNTOUCHED),
        (["lo.x"], [], {"lo": [{"x": 1}]}),
        (["o.x", "l.x"], [], {}),
        ([], ["lo.x"], {**UNTOUCHED, "arr": DOC["arr"], "lo": [{}, 3]}),
        # Map filtering: an object its include names stays when emptied; emptied array items go.
        (["a"], ["a.*"], {"a": {}}),
        ([], ["arr.*"], {**UNTOUCHED, "arr": []}),
    ],
)
def test_filter_source_rules(includes: list[str], excludes: list[str], expected: dict[str, Any]) -> None:
    assert filter_source(DOC, includes, excludes) == expected


def test_opensearch_always_filters_the_map_way() -> None:
    doc = {"a": {"b": 1}}
    assert filter_source(doc, [], ["a.b"]) == {}
    assert filter_source(doc, [], ["a.b"], "opensearch") == {"a": {}}


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
    hit = {"_source": {"title": "T", "text": "passage"}}
    restore_hit(hit, patch)
    assert hit == {"_source": {"title": "T"}}


def test_wildcard_exclude_removes_every_match_after_restore() -> None:
    patch = plan_source(SourceFilter(excludes=("t*", "secret*")), ("text",))
    assert patch is not None
    assert patch.upstream == SourceFilter(excludes=("secret*",))
    hit = {"_source": {"text": "p", "title": "T", "tags": ["x"], "body": "B", "secret": 1}}
    restore_hit(hit, patch)
    assert hit == {"_source": {"body": "B"}}


def test_last_wildcard_exclude_dropped_fetches_everything() -> None:
    """Map filtering keeps ``{"o": {}}`` where path filtering would drop it: no way to cut a path-filtered
    hit back to a map-filtered one, so the widened request asks for the whole ``_source``."""
    patch = plan_source(SourceFilter(excludes=("t*", "o.x")), ("text",))
    assert patch is not None
    assert patch.upstream == SourceFilter()
    hit = {"_source": {"text": "p", "o": {"x": 1}, "k": 2}}
    restore_hit(hit, patch)
    assert hit == {"_source": {"o": {}, "k": 2}}


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
    hit = {"_source": {"chunks": [{"text": "p1", "n": 1}, {"text": "p2", "n": 2}, {"text": "p3"}]}}
    restore_hit(hit, patch)
    assert hit == {"_source": {"chunks": [{"n": 1}, {"n": 2}]}}  # the emptied object goes


def test_restore_hits_none_patch_and_hit_without_source() -> None:
    hits = [{"_id": "1", "_source": {"text": "p"}}]
    before = copy.deepcopy(hits)
    restore_hits(hits, None)
    assert hits == before
    patch = plan_source(SourceFilter(fetch=False), ("text",))
    bare = {"_id": "2"}
    restore_hits([bare], patch)
    assert bare == {"_id": "2"}
