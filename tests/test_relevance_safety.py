"""Fusion, shadow mode and the A/B split through the proxy, against the real server.

Expected orders are computed here from Elasticsearch's own hits and plain-transformers scores with the
fusion formulas written out again, so the proxy's arithmetic is checked, not reused.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from elasticsearch import Elasticsearch

from .conftest import ProxyThread, make_config
from .corpus import DOCS, index_fixture
from .servers import http
from .tiny_model import reference_scores

pytestmark = pytest.mark.integration

INDEX = "rerank-safety"
TOP_K = 20
QUERY = "coffee brewed with water"
MATCH = {"match": {"text": QUERY}}


es = index_fixture((INDEX, DOCS))


def post(base: str, path: str, body: Any, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return http(
        base + path, "POST", json.dumps(body).encode(), {"Content-Type": "application/json", **headers}
    )


def ids(data: dict[str, Any]) -> list[str]:
    return [h["_id"] for h in data["hits"]["hits"]]


def head(es: Elasticsearch, model: Path) -> tuple[list[str], list[float], list[float]]:
    hits = es.search(index=INDEX, query=MATCH, size=TOP_K)["hits"]["hits"]
    return (
        [h["_id"] for h in hits],
        [h["_score"] for h in hits],
        reference_scores(model, QUERY, [h["_source"]["text"] for h in hits]),
    )


def settled_stats(server: ProxyThread, compared: int) -> dict[str, Any]:
    """The proxy's stats once ``compared`` shadow comparisons are done (they run after the answer)."""
    stats: dict[str, Any] = {}
    for _ in range(200):
        stats = json.loads(http(server.admin_url + "/_rerank/stats")[2])
        if stats["shadow"]["compared"] >= compared:
            break
        time.sleep(0.05)
    return stats


def by_score(names: list[str], scores: list[float]) -> list[str]:
    return [names[i] for i in sorted(range(len(names)), key=lambda i: -scores[i])]


def test_rrf_fusion_through_the_proxy(es: Elasticsearch, proxy: ProxyThread, tiny_model: Path) -> None:
    names, _, model = head(es, tiny_model)
    model_rank = {i: r for r, i in enumerate(sorted(range(len(model)), key=lambda i: -model[i]), start=1)}
    fused = [1 / (60 + i + 1) + 1 / (60 + model_rank[i]) for i in range(len(names))]
    _, headers, raw = post(
        proxy.url, f"/{INDEX}/_search", {"query": MATCH, "size": 10, "_rerank": {"fusion": "rrf"}}
    )
    served = json.loads(raw)
    assert headers["x-rerank-status"] == "reranked"
    assert ids(served) == by_score(names, fused)[:10]
    assert [h["_score"] for h in served["hits"]["hits"]] == pytest.approx(sorted(fused, reverse=True)[:10])
    assert ids(served) != by_score(names, model)[:10]  # fusion did change the model's order here


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_linear_fusion_through_the_proxy(
    es: Elasticsearch, proxy: ProxyThread, tiny_model: Path, weight: float
) -> None:
    names, bm25, model = head(es, tiny_model)

    def norm(xs: list[float]) -> list[float]:
        return [(x - min(xs)) / (max(xs) - min(xs)) for x in xs]

    fused = [weight * m + (1 - weight) * e for m, e in zip(norm(model), norm(bm25), strict=True)]
    body = {"query": MATCH, "size": 10, "_rerank": {"fusion": {"mode": "linear", "weight": weight}}}
    served = json.loads(post(proxy.url, f"/{INDEX}/_search", body)[2])
    assert ids(served) == by_score(names, fused)[:10]
    if weight == 0.0:
        assert ids(served) == names[:10]  # all Elasticsearch


def test_fusion_from_the_servers_settings(es_url: str, es: Elasticsearch, tiny_model: Path) -> None:
    server = ProxyThread(
        make_config(es_url, tiny_model, top_k=TOP_K, fusion="linear", fusion_weight=0.0)
    ).start()
    try:
        served = json.loads(post(server.url, f"/{INDEX}/_search", {"query": MATCH, "size": 5})[2])
    finally:
        server.stop()
    assert ids(served) == ids(es.search(index=INDEX, query=MATCH, size=5))


def _without_took(raw: bytes) -> bytes:
    return re.sub(rb'"took":\d+', b'"took":0', raw, count=1)


def test_shadow_mode_answers_with_elasticsearchs_bytes_and_compares(
    es_url: str, es: Elasticsearch, tiny_model: Path
) -> None:
    server = ProxyThread(make_config(es_url, tiny_model, top_k=TOP_K, mode="shadow")).start()
    try:
        relevant = {"_rerank": {"relevant": ["2", "12"]}}
        searches = [
            {"query": MATCH, "size": 10},
            {"query": {"match": {"text": "sourdough bread starter"}}, "size": 5, **relevant},
        ]
        for body in searches:
            plain = {k: v for k, v in body.items() if k != "_rerank"}
            _, _, direct = post(es_url, f"/{INDEX}/_search", plain)
            status, headers, shadowed = post(server.url, f"/{INDEX}/_search", body)
            assert status == 200 and (headers["x-rerank-status"], headers["x-rerank-reason"]) == (
                "skipped",
                "shadow",
            )
            assert _without_took(shadowed) == _without_took(direct)  # Elasticsearch's own bytes
        stats = settled_stats(server, compared=2)
        _, _, scraped = http(server.admin_url + "/metrics")
    finally:
        server.stop()
    shadow = stats["shadow"]
    assert shadow["compared"] == 2 and shadow["dropped"] == 0
    assert -1.0 <= shadow["mean_kendall_tau"] <= 1.0 and 0.0 <= shadow["mean_overlap@10"] <= 1.0
    assert shadow["mean_es_top_hit_rank"] >= 1.0
    assert stats["relevance"]["judged_searches"] == 1
    assert stats["searches"]["skipped"]["shadow"] == 2
    # The background comparisons are in the metrics too, not only in /_rerank/stats.
    for result, count in (("compared", 2), ("dropped", 0), ("unscorable", 0)):
        line = f'rerank_proxy_shadow_comparisons_total{{result="{result}"}} {float(count)}'
        assert line in scraped.decode().splitlines(), line


def test_shadow_mode_figures_are_the_models(es_url: str, es: Elasticsearch, tiny_model: Path) -> None:
    """Shadow mode compares what serving would rerank, Elasticsearch's top_k, whatever page the client
    asked for: each figure is computed here again from the same hits and plain-transformers scores."""
    server = ProxyThread(make_config(es_url, tiny_model, top_k=TOP_K, mode="shadow")).start()
    try:
        post(server.url, f"/{INDEX}/_search", {"query": MATCH, "size": 3})
        shadow = settled_stats(server, compared=1)["shadow"]
    finally:
        server.stop()
    _, _, model = head(es, tiny_model)
    n = len(model)
    order = sorted(range(n), key=lambda i: -model[i])
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    tau = sum((model[i] > model[j]) - (model[i] < model[j]) for i, j in pairs) / len(pairs)
    assert shadow["compared"] == 1
    assert shadow["mean_es_top_hit_rank"] == order.index(0) + 1
    assert shadow["mean_overlap@10"] == pytest.approx(len(set(order[:10]) & set(range(10))) / 10)
    assert shadow["mean_kendall_tau"] == pytest.approx(tau)


def test_shadow_mode_compares_each_msearch_item(es_url: str, es: Elasticsearch, tiny_model: Path) -> None:
    server = ProxyThread(make_config(es_url, tiny_model, top_k=TOP_K, mode="shadow")).start()
    lines = [
        {"index": INDEX},
        {"query": MATCH, "size": 2},
        {"index": INDEX},
        {"query": MATCH, "sort": ["_doc"]},
    ]
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    try:
        status, headers, raw = http(
            server.url + "/_msearch", "POST", body, {"Content-Type": "application/x-ndjson"}
        )
        shadow = settled_stats(server, compared=1)["shadow"]
    finally:
        server.stop()
    assert status == 200 and headers["x-rerank-items"] == "skipped:shadow,skipped:sort"
    assert len(json.loads(raw)["responses"][0]["hits"]["hits"]) == 2  # the client's own answer
    assert (shadow["compared"], shadow["unscorable"], shadow["dropped"]) == (1, 0, 0)


def test_ab_split_is_sticky_and_labelled(es_url: str, es: Elasticsearch, tiny_model: Path) -> None:
    cfg = make_config(es_url, tiny_model, top_k=TOP_K)
    cfg = replace(cfg, rerank=replace(cfg.rerank, sample_rate=0.5, sample_key_header="X-Session"))
    server = ProxyThread(cfg).start()
    try:
        seen: dict[str, set[str]] = {}
        for session in [f"user-{i}" for i in range(12)] * 2:
            _, headers, raw = post(
                server.url, f"/{INDEX}/_search", {"query": MATCH, "size": 5}, **{"X-Session": session}
            )
            seen.setdefault(session, set()).add(headers["x-rerank-variant"])
            if headers["x-rerank-variant"] == "control":
                assert headers["x-rerank-reason"] == "not_sampled"
                assert ids(json.loads(raw)) == ids(es.search(index=INDEX, query=MATCH, size=5))
            else:
                assert headers["x-rerank-status"] == "reranked"
    finally:
        server.stop()
    assert all(len(variants) == 1 for variants in seen.values())  # one user, one variant
    assert {v for variants in seen.values() for v in variants} == {"rerank", "control"}
