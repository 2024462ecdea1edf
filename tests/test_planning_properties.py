"""Properties of the pure request and response functions on arbitrary input.

Requests: whatever JSON a client sends, query extraction never fails and planning fails only with
:class:`BadRequest` (an Elasticsearch-shaped 400). Responses: whatever the scores, the client's window
is a slice of (the reranked head, then Elasticsearch's tail), made of the hits Elasticsearch sent,
each once, the tail in Elasticsearch's order. Those hold whatever ordering rules the planner and
the response rewriter adopt; the rules themselves have their own example tests.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st

from proxy.config import RerankConfig
from proxy.errors import BadRequest
from proxy.query_text import extract_query_text, lucene_to_text, text_at_path
from proxy.search_plan import OVERRIDE_KEY, Passthrough, RerankPlan, parse_overrides, plan_search
from proxy.search_response import apply_order, candidates

from .strategies import json_objects, json_values

# Keys the planner reads, so that arbitrary values land where they matter.
_BODY_KEYS = ("query", "from", "size", "sort", "_source", "stored_fields", "search_after", "pit", "min_score")
_PARAM_KEYS = ("q", "from", "size", "sort", "_source", "_source_includes", "_source_excludes", "scroll")
_QUERY_KINDS = (
    "match",
    "multi_match",
    "query_string",
    "bool",
    "dis_max",
    "function_score",
    "boosting",
    "nested",
)

queries: st.SearchStrategy[Any] = st.recursive(
    json_values,
    lambda inner: (
        st.dictionaries(st.sampled_from(_QUERY_KINDS), inner, max_size=2)
        | st.dictionaries(
            st.sampled_from(("must", "should", "filter", "queries", "query", "positive")), inner
        )
        | st.lists(inner, max_size=3)
    ),
    max_leaves=20,
)
bodies = st.one_of(
    json_objects,
    st.fixed_dictionaries({"query": queries}, optional={k: json_values for k in _BODY_KEYS if k != "query"}),
    st.fixed_dictionaries({"query": queries, OVERRIDE_KEY: json_values}),
)
params = st.lists(
    st.tuples(st.sampled_from(_PARAM_KEYS) | st.text(max_size=6), st.text(max_size=12)), max_size=5
)
headers = st.dictionaries(
    st.sampled_from(("X-Rerank-Query", "X-Rerank-Field", "X-Rerank-Top-K", "X-Rerank-Enabled")),
    st.text(max_size=8),
)


def _normalized(text: str) -> bool:
    return text == " ".join(text.split())


@given(body=json_objects | st.fixed_dictionaries({"query": queries}))
def test_extract_query_text_never_fails(body: dict[str, Any]) -> None:
    text = extract_query_text(body)
    assert text is None or (text and _normalized(text))


@given(query=st.text(max_size=60))
def test_lucene_to_text_never_fails(query: str) -> None:
    assert _normalized(lucene_to_text(query))


@given(body=json_objects | st.fixed_dictionaries({"query": queries}), path=st.text(max_size=20))
def test_text_at_path_never_fails(body: dict[str, Any], path: str) -> None:
    text = text_at_path(body, path)
    assert text is None or text.strip()


def test_deeply_nested_body_is_read_without_recursion() -> None:
    """Valid JSON that the proxy's parser accepts (1000 levels) must not exhaust Python's stack."""
    query: Any = {"match": {"text": "deep"}}
    for _ in range(1000):
        query = [query]
    assert extract_query_text({"query": {"bool": {"must": query}}}) == "deep"


@given(body=bodies, params=params, headers=headers)
def test_planning_fails_only_with_bad_request(
    body: dict[str, Any], params: list[tuple[str, str]], headers: dict[str, str]
) -> None:
    before = copy.deepcopy(body)
    try:
        overrides = parse_overrides(headers, body)
        body.pop(OVERRIDE_KEY, None)
        before.pop(OVERRIDE_KEY, None)
        plan = plan_search(params, body, RerankConfig(top_k=5, max_top_k=10), overrides)
    except BadRequest:
        return
    assert isinstance(plan, (Passthrough, RerankPlan))
    assert body == before  # the caller's body is never changed


def _plan(top_k: int, start: int, size: int) -> RerankPlan:
    return RerankPlan(
        query="q",
        fields=("text",),
        top_k=top_k,
        start=start,
        size=size,
        dropped_params=frozenset(),
        body={},
        source=None,
    )


@st.composite
def windows(draw: st.DrawFn) -> tuple[dict[str, Any], RerankPlan, list[float | None] | None]:
    """A response of n hits, a plan, and scores for its candidates (None: Elasticsearch's order)."""
    n = draw(st.integers(0, 12))
    top_k = draw(st.integers(1, 10))
    plan = _plan(top_k, draw(st.integers(0, 14)), draw(st.integers(1, 14)))
    texts = st.sampled_from(["", "p", "q r"]) | st.none()
    hits = []
    for i in range(n):
        source = {} if (text := draw(texts)) is None else {"text": text}
        hits.append({"_id": f"h{i}", "_score": float(n - i), "_source": source})
    response = {"took": 1, "hits": {"total": {"value": n, "relation": "eq"}, "max_score": None, "hits": hits}}
    score = st.floats(-5, 5, allow_nan=False) | st.none()
    scores = draw(st.none() | st.lists(score, min_size=min(n, top_k), max_size=min(n, top_k)))
    return response, plan, scores


@given(case=windows())
def test_served_window_is_a_slice_of_reranked_head_then_tail(
    case: tuple[dict[str, Any], RerankPlan, list[float | None] | None],
) -> None:
    response, plan, scores = case
    ids = [h["_id"] for h in response["hits"]["hits"]]
    assert len(candidates(response, plan)) == len(ids[: plan.top_k])
    assume(scores is None or all(s is not None for s in scores) or _accepts_missing_scores(response, plan))
    served = [h["_id"] for h in apply_order(copy.deepcopy(response), plan, scores)["hits"]["hits"]]

    head, tail = ids[: plan.top_k], ids[plan.top_k :]
    expected_len = len(ids[plan.start : plan.start + plan.size])
    assert len(served) == expected_len
    assert len(set(served)) == len(served)  # no hit twice
    assert set(served) <= set(ids)  # only hits Elasticsearch sent
    if scores is None:
        assert served == ids[plan.start : plan.start + plan.size]
        return
    # A slice of (some order of the head) + tail: head hits first, exactly as many as the window
    # overlaps the head, then the tail from the right place, in Elasticsearch's order.
    in_head = [i for i in served if i in head]
    assert served[: len(in_head)] == in_head
    assert len(in_head) == max(0, min(len(head), plan.start + plan.size) - plan.start)
    first_tail = max(0, plan.start - len(head))
    assert served[len(in_head) :] == tail[first_tail : first_tail + expected_len - len(in_head)]


def _accepts_missing_scores(response: dict[str, Any], plan: RerankPlan) -> bool:
    """Whether ``apply_order`` takes None for a hit without passage text (it does since the missing
    passage text rule; the window invariants hold either way)."""
    try:
        apply_order(copy.deepcopy(response), plan, [None] * len(candidates(response, plan)))
    except TypeError:
        return False
    return True
