"""Properties of ``_source`` widening on arbitrary requests and documents, without a server.

The server is stood in for by ``tests/source_model.py``, a reference model of its filtering that
``test_source_filter_server.py`` pins against real servers. The central property: whatever the
document and the client's filter, the proxy's widened request returns the passage text in full,
and cutting the widened hit back gives exactly the ``_source`` a direct search returns.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.search_response import passage_text
from proxy.source_filter import SourceFilterError, parse_source_filter, plan_source, restore_hit
from proxy.source_semantics import Engine

from .source_model import read_source, reference_filter
from .strategies import body_sources, documents, json_values, passage_fields, url_params

ENGINES: tuple[Engine, ...] = ("elasticsearch", "opensearch")


@given(
    body=json_values,
    params=st.dictionaries(
        st.sampled_from(["_source", "_source_includes", "_source_excludes", "q"]), st.text(max_size=12)
    ),
)
def test_parse_and_plan_raise_only_source_filter_error(body: Any, params: dict[str, str]) -> None:
    try:
        flt = parse_source_filter(body, params)
    except SourceFilterError:
        return
    for engine in ENGINES:
        patch = plan_source(flt, ("text", "a.text"), engine)
        if patch is not None:
            patch.upstream.to_body()


def _direct(doc: dict[str, Any], includes: list[str], excludes: list[str], engine: Engine) -> dict[str, Any]:
    return reference_filter(doc, includes, excludes, engine)


@pytest.mark.parametrize("engine", ENGINES)
@given(
    doc=documents,
    body=body_sources,
    params=url_params | st.just({}),
    fields=passage_fields,
)
def test_restoring_the_widened_hit_gives_the_direct_source(
    engine: Engine, doc: dict[str, Any], body: Any, params: dict[str, str], fields: tuple[str, ...]
) -> None:
    flt = parse_source_filter(body, params)
    direct = _direct(doc, list(flt.includes), list(flt.excludes), engine) if flt.fetch else None
    patch = plan_source(flt, fields, engine)
    if patch is None:  # the client's own filter already returns every passage field whole
        assert direct is not None
        assert passage_text({"_source": direct}, fields) == passage_text({"_source": doc}, fields)
        return
    fetch, includes, excludes = read_source(patch.upstream.to_body())
    assert fetch
    widened = _direct(doc, includes, excludes, engine)
    assert passage_text({"_source": widened}, fields) == passage_text({"_source": doc}, fields)
    hit = {"_id": "1", "_source": widened}
    restore_hit(hit, patch)
    assert hit.get("_source") == direct
    assert ("_source" in hit) == flt.fetch


def _triggers(value: Any) -> set[str]:
    """What in a body ``_source`` draws a warning or a refusal on some server: ``include``/``exclude``
    (Elasticsearch's deprecation), an empty array or object (OpenSearch 3's deprecations, taken
    broadly), a pattern both included and excluded (OpenSearch 3 refuses it)."""
    if isinstance(value, list):
        return {"empty array"} if not value else set()
    if not isinstance(value, dict):
        return set()
    found = {f"deprecated {k}" for k in ("include", "exclude") if k in value}
    found |= {f"empty {k}" for k, v in value.items() if v == []}
    if all(v == [] for v in value.values()):
        found.add("empty object")
    _, includes, excludes = read_source(value)
    if set(includes) & set(excludes):
        found.add("contradiction")
    return found


@given(body=body_sources, params=url_params | st.just({}), fields=passage_fields)
def test_widened_body_draws_no_new_warning_and_keeps_deprecated_keys(
    body: Any, params: dict[str, str], fields: tuple[str, ...]
) -> None:
    flt = parse_source_filter(body, params)
    patch = plan_source(flt, fields)
    if patch is None:
        return
    widened = patch.upstream.to_body()
    client, ours = _triggers(body), _triggers(widened)
    assert ours - {"contradiction"} <= client
    assert {t for t in ours if t.startswith("deprecated")} == {
        t for t in client if t.startswith("deprecated")
    }
    if set(flt.includes) & set(flt.excludes):  # what OpenSearch 3 refuses stays refused
        assert "contradiction" in ours
    elif "contradiction" in ours:
        assert "contradiction" in client


@given(body=body_sources, fields=passage_fields)
def test_widened_body_keeps_string_values_when_they_still_fit(body: Any, fields: tuple[str, ...]) -> None:
    patch = plan_source(parse_source_filter(body, {}), fields)
    if patch is None or not isinstance(body, dict):
        return
    widened = patch.upstream.to_body()
    if not isinstance(widened, dict):  # everything fetched (``true``): no key to keep a shape for
        return
    for key, value in body.items():
        if isinstance(value, str) and isinstance(widened.get(key), list):
            assert len(widened[key]) != 1
