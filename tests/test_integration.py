"""End to end: the official elasticsearch client, through the proxy, to a real Elasticsearch.

The expected reranked order is computed here with plain transformers on the hits Elasticsearch
itself returns, so these tests check the proxy against the model and the cluster, not against itself.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from elasticsearch import AsyncElasticsearch, Elasticsearch, helpers

from .conftest import ProxyThread
from .corpus import DOCS, index_fixture
from .servers import http as _raw
from .tiny_model import reference_scores

pytestmark = pytest.mark.integration

INDEX = "rerank-test-docs"
QUERY = "coffee brewed with water"
TOP_K = 20  # the session proxy's top_k


es = index_fixture((INDEX, DOCS))


@pytest.fixture
def via_proxy(proxy: ProxyThread, es: Elasticsearch) -> Iterator[Elasticsearch]:
    client = Elasticsearch(proxy.url)
    yield client
    client.close()


def expected_order(es: Elasticsearch, model: Path, text: str, top_k: int = TOP_K, **search: Any) -> list[str]:
    """The reranked ids: Elasticsearch's own top_k, sorted by the model's score (ties keep ES order)."""
    hits = es.search(index=INDEX, size=top_k, **search)["hits"]["hits"]
    scores = reference_scores(model, text, [h["_source"]["text"] for h in hits])
    order = sorted(range(len(hits)), key=lambda i: -scores[i])
    return [hits[i]["_id"] for i in order]


def ids(resp: Any) -> list[str]:
    return [h["_id"] for h in resp["hits"]["hits"]]


def test_search_is_reranked_as_the_model_scores(
    es: Elasticsearch, via_proxy: Elasticsearch, tiny_model: Path
) -> None:
    query = {"match": {"text": QUERY}}
    direct = es.search(index=INDEX, query=query, size=10)
    resp = via_proxy.search(index=INDEX, query=query, size=10)

    assert resp.meta.headers["X-Rerank-Status"] == "reranked"
    expected = expected_order(es, tiny_model, QUERY, query=query)
    assert ids(resp) == expected[:10]
    assert ids(resp) != ids(direct)  # the tiny model does disagree with BM25 on this query
    scores = [h["_score"] for h in resp["hits"]["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert resp["hits"]["max_score"] == scores[0]
    # Everything reranking does not touch is Elasticsearch's own answer.
    assert set(resp.body) == set(direct.body)
    assert resp["hits"]["total"] == direct["hits"]["total"]
    assert resp["_shards"] == direct["_shards"]
    assert resp["timed_out"] == direct["timed_out"]
    by_id = {h["_id"]: h for h in es.search(index=INDEX, query=query, size=TOP_K)["hits"]["hits"]}
    for hit in resp["hits"]["hits"]:
        original = by_id[hit["_id"]]
        assert {k: v for k, v in hit.items() if k != "_score"} == {
            k: v for k, v in original.items() if k != "_score"
        }


async def test_async_client_gets_the_same_reranked_page(
    es: Elasticsearch, proxy: ProxyThread, tiny_model: Path
) -> None:
    query = {"multi_match": {"query": QUERY, "fields": ["title", "text"]}}
    async with AsyncElasticsearch(proxy.url) as client:
        resp = await client.search(index=INDEX, query=query, size=5, from_=3)
    assert resp.meta.headers["X-Rerank-Status"] == "reranked"
    assert ids(resp) == expected_order(es, tiny_model, QUERY, query=query)[3:8]


def test_pages_partition_the_reranked_list(
    es: Elasticsearch, via_proxy: Elasticsearch, tiny_model: Path
) -> None:
    query = {"bool": {"must": [{"match": {"text": QUERY}}], "filter": [{"term": {"tag": "coffee"}}]}}
    pages = [ids(via_proxy.search(index=INDEX, query=query, size=4, from_=f)) for f in (0, 4, 8)]
    expected = expected_order(es, tiny_model, QUERY, query=query)
    assert [i for page in pages for i in page] == expected[:12]


def test_window_beyond_top_k_is_elasticsearch_order(es: Elasticsearch, via_proxy: Elasticsearch) -> None:
    query = {"match": {"text": "water"}}
    resp = via_proxy.search(index=INDEX, query=query, size=5, from_=TOP_K)
    assert resp.meta.headers["X-Rerank-Reason"] == "window_beyond_top_k"
    assert ids(resp) == ids(es.search(index=INDEX, query=query, size=5, from_=TOP_K))


def test_q_parameter_and_source_filter_excluding_the_passage(
    es: Elasticsearch, via_proxy: Elasticsearch, tiny_model: Path
) -> None:
    resp = via_proxy.search(index=INDEX, q="text:(coffee OR tea) AND water", size=5, source_excludes=["text"])
    assert resp.meta.headers["X-Rerank-Status"] == "reranked"
    assert all("text" not in h["_source"] and "title" in h["_source"] for h in resp["hits"]["hits"])
    expected = expected_order(es, tiny_model, "coffee tea water", q="text:(coffee OR tea) AND water")
    assert ids(resp) == expected[:5]

    no_source = via_proxy.search(index=INDEX, query={"match": {"text": QUERY}}, size=3, source=False)
    assert no_source.meta.headers["X-Rerank-Status"] == "reranked"
    assert all("_source" not in h for h in no_source["hits"]["hits"])


def test_aggregations_and_highlights_survive(es: Elasticsearch, via_proxy: Elasticsearch) -> None:
    body: dict[str, Any] = {
        "query": {"match": {"text": QUERY}},
        "aggs": {"tags": {"terms": {"field": "tag"}}, "years": {"stats": {"field": "year"}}},
        "highlight": {"fields": {"text": {}}},
        "size": 5,
    }
    direct = es.search(index=INDEX, **body)
    resp = via_proxy.search(index=INDEX, **body)
    assert resp.meta.headers["X-Rerank-Status"] == "reranked"
    assert resp["aggregations"] == direct["aggregations"]
    assert all(h["highlight"]["text"] for h in resp["hits"]["hits"])


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"query": {"match": {"text": QUERY}}, "sort": [{"year": "desc"}]}, "sort"),
        ({"query": {"match_all": {}}}, "no_query_text"),
        ({"query": {"match": {"text": QUERY}}, "size": 0}, "size_zero"),
        ({"query": {"match": {"text": QUERY}}, "scroll": "1m"}, "scroll"),
    ],
)
def test_passthrough_cases_answer_like_elasticsearch(
    es: Elasticsearch, via_proxy: Elasticsearch, kwargs: dict[str, Any], reason: str
) -> None:
    resp = via_proxy.search(index=INDEX, **kwargs)
    direct = es.search(index=INDEX, **kwargs)
    assert resp.meta.headers["X-Rerank-Status"] == "skipped"
    assert resp.meta.headers["X-Rerank-Reason"] == reason
    assert ids(resp) == ids(direct)
    assert resp["hits"]["total"] == direct["hits"]["total"]
    if "scroll" in kwargs:  # the scroll continues through the proxy like against the cluster
        more = via_proxy.scroll(scroll_id=resp["_scroll_id"], scroll="1m")
        assert ids(more) == ids(es.scroll(scroll_id=direct["_scroll_id"], scroll="1m"))


def test_per_request_overrides(es: Elasticsearch, via_proxy: Elasticsearch, tiny_model: Path) -> None:
    query = {"match": {"text": QUERY}}
    off = via_proxy.search(index=INDEX, body={"query": query, "size": 5, "_rerank": {"enabled": False}})
    assert off.meta.headers["X-Rerank-Reason"] == "disabled"
    assert ids(off) == ids(es.search(index=INDEX, query=query, size=5))

    other = "sourdough bread starter"
    resp = via_proxy.search(
        index=INDEX, body={"query": query, "size": 5, "_rerank": {"query": other, "top_k": 8}}
    )
    assert ids(resp) == expected_order(es, tiny_model, other, top_k=8, query=query)[:5]

    hdr = via_proxy.options(headers={"X-Rerank-Query": other, "X-Rerank-Top-K": "8"}).search(
        index=INDEX, query=query, size=5
    )
    assert ids(hdr) == ids(resp)


# Byte-equal pass-through, relayed errors included: test_server_matrix.py, against every server.


def test_compressed_answers_are_relayed_untouched(es_url: str, proxy: ProxyThread, es: Elasticsearch) -> None:
    path, headers = f"/{INDEX}/_mapping", {"Accept-Encoding": "gzip"}
    _, d_headers, d_body = _raw(es_url + path, headers=headers)
    _, p_headers, p_body = _raw(proxy.url + path, headers=headers)
    assert p_headers.get("content-encoding") == d_headers.get("content-encoding") == "gzip"
    assert gzip.decompress(p_body) == gzip.decompress(d_body)


def test_gzip_request_body_is_reranked(es: Elasticsearch, proxy: ProxyThread, tiny_model: Path) -> None:
    body = gzip.compress(b'{"query": {"match": {"text": "coffee brewed with water"}}, "size": 4}')
    status, headers, data = _raw(
        f"{proxy.url}/{INDEX}/_search",
        "POST",
        body,
        {"Content-Type": "application/json", "Content-Encoding": "gzip", "Accept-Encoding": "gzip"},
    )
    assert status == 200 and headers["x-rerank-status"] == "reranked"
    assert headers["content-encoding"] == "gzip"  # as Elasticsearch compresses for this client
    import json

    got = [h["_id"] for h in json.loads(gzip.decompress(data))["hits"]["hits"]]
    assert got == expected_order(es, tiny_model, QUERY, query={"match": {"text": QUERY}})[:4]


def test_client_product_check_and_info_work(via_proxy: Elasticsearch, es: Elasticsearch) -> None:
    # (GET / is not in the integ-test distribution, so the product check runs on other APIs.)
    assert via_proxy.cluster.health()["cluster_name"] == es.cluster.health()["cluster_name"]
    assert via_proxy.exists(index=INDEX, id="1")
    assert via_proxy.count(index=INDEX)["count"] == len(DOCS)


def test_writes_pass_through(via_proxy: Elasticsearch, es: Elasticsearch) -> None:
    via_proxy.index(
        index="rerank-test-writes", id="a", document={"text": "written through the proxy"}, refresh=True
    )
    assert es.get(index="rerank-test-writes", id="a")["_source"]["text"] == "written through the proxy"
    via_proxy.indices.delete(index="rerank-test-writes")
    assert not es.indices.exists(index="rerank-test-writes")


def test_client_with_http_compress(proxy: ProxyThread, es: Elasticsearch, tiny_model: Path) -> None:
    """http_compress=True gzips request bodies: bulk and search must both survive the proxy."""
    with Elasticsearch(proxy.url, http_compress=True) as client:
        helpers.bulk(
            client,
            ({"_index": "rerank-test-gzip", "_id": str(i), "text": f"doc {i}"} for i in range(5)),
            refresh=True,
        )
        assert es.count(index="rerank-test-gzip")["count"] == 5
        client.indices.delete(index="rerank-test-gzip")
        resp = client.search(index=INDEX, query={"match": {"text": QUERY}}, size=4)
    assert resp.meta.headers["X-Rerank-Status"] == "reranked"
    assert ids(resp) == expected_order(es, tiny_model, QUERY, query={"match": {"text": QUERY}})[:4]
