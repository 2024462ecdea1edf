"""Turning Elasticsearch's widened answer into the answer the client asked for.

Pure functions on the parsed response. Only ``hits.hits`` (order, window, ``_score``, the passage
field the proxy added to ``_source``) and ``hits.max_score`` change; ``took``, ``hits.total``,
``aggregations``, ``suggest``, ``_shards``, ``timed_out``, highlights and every other key stay as
Elasticsearch gave them.

Ordering contract: the first ``top_k`` hits are reordered by the reranker's score (ties keep
Elasticsearch's order); hits past ``top_k`` follow them in Elasticsearch's order with their
original ``_score``, so a page never shows a non-reranked hit above a reranked one and paging stays
consistent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .search_plan import RerankPlan
from .source_filter import restore_hits


def _at_path(source: Any, path: str) -> list[str]:
    """Every string under a dotted path; lists (of values or of objects) are walked.

    A literal dotted key (``{"a.b": ...}``, which Elasticsearch indexes like an object path) is
    looked up first.
    """
    if isinstance(source, dict) and path in source:
        nodes = [source[path]]
        path = ""
    else:
        nodes = [source]
    for part in path.split(".") if path else []:
        nxt: list[Any] = []
        for node in nodes:
            if isinstance(node, list):
                nxt.extend(n[part] for n in node if isinstance(n, dict) and part in n)
            elif isinstance(node, dict) and part in node:
                nxt.append(node[part])
        nodes = nxt
    out: list[str] = []
    for node in nodes:
        for value in node if isinstance(node, list) else [node]:
            if isinstance(value, str):
                out.append(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append(str(value))
    return out


def passage_text(hit: dict[str, Any], fields: Sequence[str]) -> str:
    """The text the reranker reads for a hit; a missing field contributes nothing."""
    source = hit.get("_source") or {}
    return " ".join(text for f in fields for text in _at_path(source, f)).strip()


def candidates(response: dict[str, Any], plan: RerankPlan) -> list[str]:
    """Passage texts of the hits to rerank, in Elasticsearch's order; "" where a hit has none."""
    hits = response.get("hits", {}).get("hits", [])
    return [passage_text(hit, plan.fields) for hit in hits[: plan.top_k]]


def served_order(scores: Sequence[float | None]) -> list[int]:
    """Positions of the reranked head in the served order: scored hits by score (ties keep
    Elasticsearch's order), then the hits without passage text in Elasticsearch's order."""
    scored = [(i, s) for i, s in enumerate(scores) if s is not None]
    scored.sort(key=lambda pair: -pair[1])
    return [i for i, _ in scored] + [i for i, s in enumerate(scores) if s is None]


def reranked_ids(
    response: dict[str, Any], plan: RerankPlan, scores: Sequence[float | None]
) -> tuple[list[str], list[str]]:
    """The reranked window's ``_id``s in Elasticsearch's order and in the served order: what online
    relevance tracking compares."""
    head = response.get("hits", {}).get("hits", [])[: plan.top_k]
    original = [str(hit.get("_id")) for hit in head]
    return original, [original[i] for i in served_order(scores)]


def apply_order(
    response: dict[str, Any], plan: RerankPlan, scores: Sequence[float | None] | None
) -> dict[str, Any]:
    """The client's window of the response; reranked by ``scores``, or in Elasticsearch's order if None.

    Mutates and returns ``response``. ``scores`` has one entry per hit returned by
    :func:`candidates`, None for a hit without passage text. A reranked answer stays self-consistent:
    the model's scores are the only ``_score``s in it, so they never disagree with the order;
    ``max_score`` is their maximum, and the hits the model did not score (no passage text, or past
    ``top_k``) come after the scored ones with ``_score: null``, as Elasticsearch writes a hit it did
    not score.
    """
    hits_obj = response.get("hits")
    if not isinstance(hits_obj, dict) or not isinstance(hits_obj.get("hits"), list):
        return response
    hits: list[dict[str, Any]] = hits_obj["hits"]
    if scores is not None:
        head = hits[: plan.top_k]
        if len(scores) != len(head):
            raise ValueError(f"got {len(scores)} scores for {len(head)} hits")
        for hit, score in zip(head, scores, strict=True):
            hit["_score"] = None if score is None else float(score)
        for hit in hits[plan.top_k :]:
            hit["_score"] = None
        hits = [head[i] for i in served_order(scores)] + hits[plan.top_k :]
        present = [s for s in scores if s is not None]
        if present:
            hits_obj["max_score"] = float(max(present))
    window = hits[plan.start : plan.start + plan.size]
    restore_hits(window, plan.source)
    hits_obj["hits"] = window
    return response
