"""Fidelity against the real server: what Elasticsearch answers directly, the client gets through the
proxy, except the order and ``_score`` of reranked hits.

Each test sends the same request to Elasticsearch and to the proxy and compares the answers; expected
reranked orders are computed with plain transformers on Elasticsearch's own hits.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from elasticsearch import Elasticsearch

from proxy import es_json

from .conftest import ProxyThread, free_port, make_config
from .corpus import DOCS, index_fixture
from .servers import http as _raw
from .tiny_model import reference_scores

pytestmark = pytest.mark.integration

INDEX = "rerank-fidelity"
SMALL_WINDOW = "rerank-fidelity-window"  # index.max_result_window below the proxy's top_k
TOP_K = 20  # the session proxy's top_k
QUERY = "coffee brewed with water"
MATCH = {"match": {"text": QUERY}}
# Documents the text field is missing from: matched by a title query, never readable by the model.
UNTEXTED = [
    {"id": f"u{i}", "title": f"Coffee grinder manual {i}", "tag": "coffee", "year": 1990 + i}
    for i in range(4)
]
ODD_VALUES = {
    "id": "odd",
    "title": "numbers",
    "text": "odd numbers",
    "f": 1e-7,
    "g": 1.5e30,
    "e": [],
    "o": {},
}


def post(base: str, path: str, body: Any, **headers: str) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _raw(base + path, "POST", data, {"Content-Type": "application/json", **headers})


INDEXED = [*DOCS, *UNTEXTED, ODD_VALUES]
es = index_fixture((INDEX, INDEXED), (SMALL_WINDOW, INDEXED, {"max_result_window": 15}))


def ids(data: dict[str, Any]) -> list[str]:
    return [h["_id"] for h in data["hits"]["hits"]]


def expected_order(es: Elasticsearch, model: Path, body: dict[str, Any], index: str = INDEX) -> list[str]:
    """Elasticsearch's own top_k, sorted by the model's score (ties keep Elasticsearch's order)."""
    hits = es.search(index=index, body={**body, "from": 0, "size": TOP_K})["hits"]["hits"]
    scores = reference_scores(model, QUERY, [h["_source"]["text"] for h in hits])
    return [hits[i]["_id"] for i in sorted(range(len(hits)), key=lambda i: -scores[i])]


def both(es_url: str, proxy: ProxyThread, path: str, body: Any, **headers: str) -> tuple[Any, Any]:
    return post(es_url, path, body, **headers), post(proxy.url, path, body, **headers)


# -- 1. stored_fields and missing passage text -------------------------------------------------------


@pytest.mark.parametrize("stored", [[], ["title"], "_id"])
def test_stored_fields_search_is_scored_on_the_real_text(
    es_url: str, proxy: ProxyThread, es: Elasticsearch, tiny_model: Path, stored: Any
) -> None:
    body = {"query": MATCH, "stored_fields": stored, "size": 10}
    (d_status, _, d_body), (p_status, p_headers, p_body) = both(es_url, proxy, f"/{INDEX}/_search", body)
    direct, proxied = json.loads(d_body), json.loads(p_body)
    assert (p_status, p_headers["x-rerank-status"]) == (200, "reranked")
    assert ids(proxied) == expected_order(es, tiny_model, {"query": MATCH})[:10]
    assert len({h["_score"] for h in proxied["hits"]["hits"]}) > 1
    by_id = {
        h["_id"]: h
        for h in json.loads(post(es_url, f"/{INDEX}/_search", {**body, "size": TOP_K})[2])["hits"]["hits"]
    }
    for hit in proxied["hits"]["hits"]:  # what the client's stored_fields ask for, nothing more
        assert {k: v for k, v in hit.items() if k != "_score"} == {
            k: v for k, v in by_id[hit["_id"]].items() if k != "_score"
        }
    assert d_status == 200 and all("_source" not in h for h in direct["hits"]["hits"])


def test_hits_without_passage_text_follow_the_scored_ones(
    es_url: str, proxy: ProxyThread, es: Elasticsearch, tiny_model: Path
) -> None:
    body = {
        "query": {"multi_match": {"query": "coffee grinder water", "fields": ["title", "text"]}},
        "size": TOP_K,
    }
    direct = es.search(index=INDEX, body=body)["hits"]["hits"]
    _, headers, raw = post(proxy.url, f"/{INDEX}/_search", body)
    served = json.loads(raw)["hits"]["hits"]
    assert headers["x-rerank-status"] == "reranked"
    texted = [h for h in direct if "text" in h["_source"]]
    untexted = [h["_id"] for h in direct if "text" not in h["_source"]]
    assert untexted, "the query must reach documents without text"
    scores = reference_scores(tiny_model, "coffee grinder water", [h["_source"]["text"] for h in texted])
    order = [texted[i]["_id"] for i in sorted(range(len(texted)), key=lambda i: -scores[i])]
    assert [h["_id"] for h in served] == order + untexted
    assert [h["_score"] for h in served[len(order) :]] == [None] * len(untexted)


def test_no_passage_text_at_all_is_skipped_in_elasticsearch_order(
    es_url: str, proxy: ProxyThread, es: Elasticsearch
) -> None:
    body = {"query": {"match": {"title": "grinder manual"}}, "size": 3}
    (_, _, d_body), (_, p_headers, p_body) = both(es_url, proxy, f"/{INDEX}/_search", body)
    assert (p_headers["x-rerank-status"], p_headers["x-rerank-reason"]) == ("skipped", "no_passage_text")
    direct, proxied = json.loads(d_body), json.loads(p_body)
    assert proxied["hits"] == direct["hits"]


# -- 2, 3. the widened request refused or unreadable: the original goes up ------------------------


def test_index_result_window_smaller_than_top_k(es_url: str, proxy: ProxyThread, es: Elasticsearch) -> None:
    body = {"query": MATCH, "size": 10}
    (d_status, _, d_body), (p_status, p_headers, p_body) = both(
        es_url, proxy, f"/{SMALL_WINDOW}/_search", body
    )
    assert d_status == p_status == 200
    assert p_headers["x-rerank-reason"] == "upstream_rejected_rewrite"
    assert json.loads(p_body)["hits"] == json.loads(d_body)["hits"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"query": {"match": {"text": "coffee"}}, "size": 5, "from": -3}',
        b'{"query": {"match": {"text": "coffee"}},\n "size": 5, "bogus": 1}',
        b'{"query": {"match": {"text": "coffee"}}, "_source": 5}',
        b'{"query": {"match": {"text": "coffee"}}, "size": "ten"}',
        b'{"query": {"match": {"text": {"query": "coffee", "nonsense": true}}}, "size": 2}',
    ],
)
def test_rejected_searches_get_elasticsearchs_exact_error(
    es_url: str, proxy: ProxyThread, es: Elasticsearch, body: bytes
) -> None:
    (d_status, d_headers, d_body), (p_status, p_headers, p_body) = both(
        es_url, proxy, f"/{INDEX}/_search", body
    )
    assert d_status >= 400
    assert (p_status, p_body) == (d_status, d_body)
    assert p_headers["content-type"] == d_headers["content-type"]


def test_duplicate_keys_are_refused_like_elasticsearch(
    es_url: str, proxy: ProxyThread, es: Elasticsearch
) -> None:
    body = b'{"query": {"match": {"text": "coffee"}}, "size": 1, "size": 3}'
    (d_status, _, d_body), (p_status, p_headers, p_body) = both(es_url, proxy, f"/{INDEX}/_search", body)
    assert d_status == 400
    assert (p_status, p_body) == (d_status, d_body)
    assert p_headers["x-rerank-reason"] == "invalid_body"


class EncodingIntermediary:
    """An HTTP hop in front of Elasticsearch that labels every answer with a content encoding, asked or
    not: ``gzip`` really compresses; any other name leaves the bytes as they are (undecodable)."""

    def __init__(self, target: str, encoding: str) -> None:
        self.target, self.encoding, self.port = target, encoding, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "accept")}
        status, _, answer = _raw(self.target + request.raw_path, request.method, body or None, headers)
        return web.Response(
            status=status,
            body=gzip.compress(answer) if self.encoding == "gzip" else answer,
            headers={
                "Content-Encoding": self.encoding,
                "Content-Type": "application/json",
                "X-Elastic-Product": "Elasticsearch",
            },
        )

    def _run(self) -> None:
        import asyncio

        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    def __enter__(self) -> EncodingIntermediary:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.mark.parametrize(("encoding", "reason"), [("gzip", None), ("x-unknown", "unreadable_response")])
def test_encoded_answers_are_decoded_or_fall_back_to_the_clients_own_request(
    es_url: str, es: Elasticsearch, tiny_model: Path, encoding: str, reason: str | None
) -> None:
    """A compressed answer is read and reranked; one the proxy cannot decode makes it send the
    client's own request and relay that answer, never the widened one (7 hits, the excluded field)."""
    body = {"query": MATCH, "size": 2, "_source": {"excludes": ["text"]}}
    with EncodingIntermediary(es_url, encoding) as hop:
        server = ProxyThread(make_config(hop.url, tiny_model, top_k=TOP_K, field=("text",))).start()
        try:
            status, headers, raw = post(server.url, f"/{INDEX}/_search", body)
        finally:
            server.stop()
    assert (status, headers.get("x-rerank-reason")) == (200, reason)
    served = json.loads(gzip.decompress(raw) if encoding == "gzip" else raw)
    expected = (
        expected_order(es, tiny_model, {"query": MATCH})[:2]
        if reason is None
        else ids(es.search(index=INDEX, body=body))
    )
    assert ids(served) == expected
    assert all("text" not in h["_source"] for h in served["hits"]["hits"])


# -- 7, 12. the reserved key and media types --------------------------------------------------------


@pytest.mark.parametrize("value", [None, {"enabled": False}])
def test_reserved_key_never_reaches_elasticsearch(
    es_url: str, proxy: ProxyThread, es: Elasticsearch, value: Any
) -> None:
    body = {"query": MATCH, "size": 3, "sort": [{"year": "desc"}]}
    p_status, _, p_body = post(proxy.url, f"/{INDEX}/_search", {**body, "_rerank": value})
    assert p_status == 200, p_body
    assert ids(json.loads(p_body)) == ids(es.search(index=INDEX, body=body))


def test_compat_content_type_with_plain_accept_is_refused_like_elasticsearch(
    es_url: str, proxy: ProxyThread, es: Elasticsearch
) -> None:
    headers = {
        "Content-Type": "application/vnd.elasticsearch+json; compatible-with=8",
        "Accept": "application/json",
    }
    req = {"query": MATCH, "size": 3}
    (d_status, _, d_body), (p_status, _, p_body) = both(es_url, proxy, f"/{INDEX}/_search", req, **headers)
    assert d_status == 400
    assert (p_status, p_body) == (d_status, d_body)


def test_compat_media_types_on_both_sides_still_rerank(
    es_url: str, proxy: ProxyThread, es: Elasticsearch
) -> None:
    compat = "application/vnd.elasticsearch+json; compatible-with=8"
    _, headers, raw = post(
        proxy.url, f"/{INDEX}/_search", {"query": MATCH, "size": 3}, Accept=compat, **{"Content-Type": compat}
    )
    assert headers["x-rerank-status"] == "reranked"
    assert len(ids(json.loads(raw))) == 3


# -- 8. ?pretty -----------------------------------------------------------------------------------


def _same_took(pretty: bytes, compact: bytes) -> Any:
    data = json.loads(compact)
    data["took"] = json.loads(pretty)["took"]
    return data


@pytest.mark.parametrize(
    "body",
    [
        {
            "query": {"match_all": {}},
            "size": 50,
            "aggs": {"tags": {"terms": {"field": "tag"}}, "y": {"stats": {"field": "year"}}},
        },
        {"query": MATCH, "size": 3, "highlight": {"fields": {"text": {}}}, "_source": ["meta", "title"]},
        {"query": {"ids": {"values": ["odd"]}}},
    ],
)
def test_pretty_layout_is_elasticsearchs(es_url: str, es: Elasticsearch, body: dict[str, Any]) -> None:
    """The proxy's pretty printer, given Elasticsearch's compact answer, writes Elasticsearch's own
    pretty bytes for the same answer."""
    _, _, pretty = post(es_url, f"/{INDEX}/_search?pretty", body)
    _, _, compact = post(es_url, f"/{INDEX}/_search", body)
    assert es_json.dumps(_same_took(pretty, compact), pretty=True) == pretty


@pytest.mark.parametrize("param", ["?pretty", "?pretty=true"])
def test_reranked_answer_honours_pretty(proxy: ProxyThread, es: Elasticsearch, param: str) -> None:
    _, headers, raw = post(proxy.url, f"/{INDEX}/_search{param}", {"query": MATCH, "size": 3})
    assert headers["x-rerank-status"] == "reranked"
    assert raw.startswith(b'{\n  "took" : ') and raw.endswith(b"}\n")
    assert es_json.dumps(json.loads(raw), pretty=True) == raw


def test_pretty_false_is_compact(proxy: ProxyThread, es: Elasticsearch) -> None:
    _, headers, raw = post(proxy.url, f"/{INDEX}/_search?pretty=false", {"query": MATCH, "size": 3})
    assert headers["x-rerank-status"] == "reranked" and b"\n" not in raw


# -- 16. scores and sort values agree with the order ------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"sort": ["_score"]}, "sort"),
        ({"sort": [{"_score": "desc"}, "_doc"]}, "sort"),
        ({"min_score": 0.5}, "min_score"),
    ],
)
def test_score_dependent_searches_answer_like_elasticsearch(
    es_url: str, proxy: ProxyThread, es: Elasticsearch, extra: dict[str, Any], reason: str
) -> None:
    body = {"query": MATCH, "size": 5, **extra}
    (_, _, d_body), (_, p_headers, p_body) = both(es_url, proxy, f"/{INDEX}/_search", body)
    assert p_headers["x-rerank-reason"] == reason
    direct, proxied = json.loads(d_body), json.loads(p_body)
    assert proxied["hits"] == direct["hits"]


def test_window_past_top_k_is_self_consistent(
    proxy: ProxyThread, es: Elasticsearch, tiny_model: Path
) -> None:
    _, headers, raw = post(proxy.url, f"/{INDEX}/_search", {"query": MATCH, "from": 15, "size": 10})
    data = json.loads(raw)
    assert headers["x-rerank-status"] == "reranked"
    hits = data["hits"]["hits"]
    assert ids(data)[:5] == expected_order(es, tiny_model, {"query": MATCH})[15:20]
    direct_tail = es.search(index=INDEX, query=MATCH, from_=TOP_K, size=5)
    assert ids(data)[5:] == ids(direct_tail)
    scores = [h["_score"] for h in hits]
    assert scores[5:] == [None] * 5
    assert scores[:5] == sorted(scores[:5], reverse=True)
    top = json.loads(post(proxy.url, f"/{INDEX}/_search", {"query": MATCH, "size": 1})[2])["hits"]["hits"][0]
    assert data["hits"]["max_score"] == top["_score"] >= scores[0]


# -- 17. scores that are not numbers ---------------------------------------------------------------


class ConstantScorer:
    name = "constant"

    def __init__(self, value: float) -> None:
        self.value = value

    async def score(self, query: str, passages: Sequence[str]) -> list[float]:
        return [0.0] * (len(passages) - 1) + [self.value]

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_fall_back_to_elasticsearch_order(
    es_url: str, es: Elasticsearch, tiny_model: Path, value: float
) -> None:
    server = ProxyThread(make_config(es_url, tiny_model, top_k=TOP_K), scorer=ConstantScorer(value)).start()
    try:
        _, headers, raw = post(server.url, f"/{INDEX}/_search", {"query": MATCH, "size": 5})
    finally:
        server.stop()
    assert (headers["x-rerank-status"], headers["x-rerank-reason"]) == ("skipped", "rerank_error")
    direct = es.search(index=INDEX, query=MATCH, size=5)
    data = json.loads(raw)
    assert data["hits"]["hits"] == direct["hits"]["hits"]
    assert not re.search(rb"NaN|Infinity|null", raw)
