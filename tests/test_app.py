"""HTTP edge cases against a scripted upstream: headers, failures, fallbacks, limits.

The upstream here is an aiohttp app defined in the test that records what it was sent, so each test
can check exactly what crossed the proxy in both directions. Behaviour against the real
Elasticsearch is covered in test_integration.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from proxy.admin import create_admin_app
from proxy.app import create_app
from proxy.batch_cost import BatchLimits
from proxy.batching import DeadlineMissed, WaitTooLong
from proxy.config import Config, RerankConfig, ServerConfig, UpstreamConfig
from proxy.scorer import EngineScorer

Hits = list[dict[str, Any]]


def es_hits(n: int) -> Hits:
    return [
        {"_index": "i", "_id": str(i), "_score": float(n - i), "_source": {"text": f"passage {i}", "n": i}}
        for i in range(n)
    ]


class FakeScorer:
    """Deterministic scorer: longer passage id scores higher; can raise or stall on demand."""

    name = "fake"

    def __init__(self, fail: BaseException | None = None, delay: float = 0.0) -> None:
        self.fail, self.delay = fail, delay
        self.calls: list[tuple[str, list[str]]] = []

    async def score(self, query: str, passages: Sequence[str]) -> list[float]:
        self.calls.append((query, list(passages)))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return [float(int(p.split()[-1])) for p in passages]  # reverses ES order

    async def aclose(self) -> None:
        pass


class Upstream:
    """A scripted Elasticsearch: records requests, answers a search with ``n`` hits."""

    def __init__(self, n: int = 30) -> None:
        self.n = n
        self.seen: list[dict[str, Any]] = []
        self.stall = 0.0

    async def handler(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            {
                "method": request.method,
                "path_qs": request.raw_path,
                "headers": dict(request.headers),
                "body": body,
            }
        )
        if self.stall:
            await asyncio.sleep(self.stall)
        if request.path.endswith("_search"):
            parsed = orjson.loads(body) if body else {}
            hits = es_hits(self.n)[parsed.get("from", 0) : parsed.get("from", 0) + parsed.get("size", 10)]
            payload = {
                "took": 3,
                "timed_out": False,
                "_shards": {"total": 1},
                "hits": {
                    "total": {"value": self.n, "relation": "eq"},
                    "max_score": float(self.n),
                    "hits": hits,
                },
                "aggregations": {"a": {"value": 1}},
            }
            return web.Response(
                body=orjson.dumps(payload),
                content_type="application/json",
                headers={"X-Elastic-Product": "Elasticsearch"},
            )
        return web.Response(
            status=201, body=b"created", headers={"X-Elastic-Product": "Elasticsearch", "X-Custom": "kept"}
        )


Factory = Callable[..., Awaitable[tuple[TestClient[web.Request, web.Application], Upstream]]]


async def admin_stats(client: TestClient[web.Request, web.Application]) -> Any:
    """``GET /_rerank/stats`` from the admin app of the proxy app ``client`` serves."""
    async with TestClient(TestServer(create_admin_app(client.app))) as admin:
        return await (await admin.get("/_rerank/stats")).json()


@pytest.fixture
async def make_proxy() -> Any:
    made: list[Any] = []

    async def make(
        scorer: Any = None,
        *,
        upstream_url: str | None = None,
        n: int = 30,
        upstream_userinfo: tuple[str, str] | None = None,
        **rerank: Any,
    ) -> tuple[TestClient[web.Request, web.Application], Upstream]:
        upstream = Upstream(n)
        up_app = web.Application()
        up_app.router.add_route("*", "/{tail:.*}", upstream.handler)
        up_server = TestServer(up_app)
        await up_server.start_server()
        made.append(up_server)
        own = up_server.make_url("")
        if upstream_userinfo:
            own = own.with_user(upstream_userinfo[0]).with_password(upstream_userinfo[1])
        url = upstream_url or str(own).rstrip("/")
        cfg = Config(
            server=ServerConfig(max_body_bytes=rerank.pop("max_body_bytes", 1024 * 1024)),
            upstream=UpstreamConfig(url=url, timeout_s=rerank.pop("timeout_s", 5.0)),
            rerank=RerankConfig(top_k=rerank.pop("top_k", 10), **rerank),
        )
        app = create_app(cfg, scorer=scorer or FakeScorer())
        client = TestClient(TestServer(app))  # as the CLI runs it
        await client.start_server()
        made.append(client)
        return client, upstream

    yield make
    for item in reversed(made):
        await item.close()


def ids(payload: dict[str, Any]) -> list[str]:
    return [h["_id"] for h in payload["hits"]["hits"]]


async def test_rerank_window_and_untouched_keys(make_proxy: Factory) -> None:
    client, upstream = await make_proxy(top_k=10)
    resp = await client.post("/i/_search?from=2&size=3", json={"query": {"match": {"text": "q"}}})
    data = await resp.json()
    assert resp.headers["X-Rerank-Status"] == "reranked"
    assert ids(data) == ["7", "6", "5"]  # top 10 reversed by the fake scorer, then [2, 5)
    assert data["hits"]["max_score"] == 9.0
    assert data["aggregations"] == {"a": {"value": 1}} and data["took"] == 3
    sent = orjson.loads(upstream.seen[-1]["body"])
    assert (sent["from"], sent["size"]) == (0, 10)
    assert "from=" not in upstream.seen[-1]["path_qs"] and "size=" not in upstream.seen[-1]["path_qs"]


async def test_window_straddling_top_k_keeps_es_order_after_reranked(make_proxy: Factory) -> None:
    client, upstream = await make_proxy(top_k=5)
    resp = await client.post("/i/_search", json={"query": {"match": {"text": "q"}}, "from": 3, "size": 4})
    data = await resp.json()
    assert ids(data) == ["1", "0", "5", "6"]
    assert [h["_score"] for h in data["hits"]["hits"]] == [1.0, 0.0, None, None]
    assert orjson.loads(upstream.seen[-1]["body"])["size"] == 7


async def test_headers_forwarded_and_stripped(make_proxy: Factory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client, upstream = await make_proxy()
    secret = "ApiKey c2VjcmV0LWtleS12YWx1ZQ=="
    raw_url = URL(f"http://{client.host}:{client.port}/i/_doc/1?refresh=true&routing=a%2Cb", encoded=True)
    resp = await client.session.put(
        raw_url,
        data=b'{"text": "x"}',
        headers={
            "Authorization": secret,
            "Content-Type": "application/json",
            "Connection": "keep-alive",
            "Keep-Alive": "timeout=5",
            "X-Opaque-Id": "trace-1",
            "Proxy-Authorization": "Basic eA==",
        },
    )
    assert resp.status == 201 and await resp.read() == b"created"
    assert resp.headers["X-Custom"] == "kept" and resp.headers["X-Elastic-Product"] == "Elasticsearch"
    seen = upstream.seen[-1]
    assert seen["method"] == "PUT" and seen["path_qs"] == "/i/_doc/1?refresh=true&routing=a%2Cb"
    assert seen["body"] == b'{"text": "x"}'
    assert seen["headers"]["Authorization"] == secret
    assert seen["headers"]["X-Opaque-Id"] == "trace-1"
    assert "Keep-Alive" not in seen["headers"] and "Proxy-Authorization" not in seen["headers"]
    assert secret not in caplog.text and "c2VjcmV0" not in caplog.text


async def test_override_headers_and_body_key_never_reach_upstream(make_proxy: Factory) -> None:
    scorer = FakeScorer()
    client, upstream = await make_proxy(scorer)
    resp = await client.post(
        "/i/_search",
        json={"query": {"match": {"text": "q"}}, "_rerank": {"query": "caf\u00e9 au lait", "field": "text"}},
        headers={"X-Rerank-Top-K": "4"},
    )
    assert resp.status == 200
    assert scorer.calls[-1][0] == "caf\u00e9 au lait" and len(scorer.calls[-1][1]) == 4
    assert "_rerank" not in orjson.loads(upstream.seen[-1]["body"])
    assert not any(h.lower().startswith("x-rerank") for h in upstream.seen[-1]["headers"])


async def test_bad_override_is_an_es_shaped_400(make_proxy: Factory) -> None:
    client, upstream = await make_proxy()
    resp = await client.post("/i/_search", json={"query": {"match": {"text": "q"}}, "_rerank": {"topk": 3}})
    data = await resp.json()
    assert resp.status == 400 and data["status"] == 400
    assert data["error"]["type"] == "illegal_argument_exception" and "topk" in data["error"]["reason"]
    assert data["error"]["root_cause"][0]["reason"] == data["error"]["reason"]
    assert upstream.seen == []


@pytest.mark.parametrize(
    ("scorer", "reason"),
    [
        (FakeScorer(fail=RuntimeError("CUDA out of memory")), "rerank_error"),
        (FakeScorer(delay=2.0), "rerank_timeout"),
        (FakeScorer(fail=WaitTooLong("queued work due first")), "queue_wait"),
        (FakeScorer(fail=DeadlineMissed("would finish late")), "deadline"),
    ],
)
async def test_reranker_failure_returns_es_order(
    make_proxy: Factory, scorer: FakeScorer, reason: str
) -> None:
    client, _ = await make_proxy(scorer, timeout_ms=200)
    resp = await client.post("/i/_search?size=4&from=1", json={"query": {"match": {"text": "q"}}})
    data = await resp.json()
    assert resp.status == 200
    assert resp.headers["X-Rerank-Status"] == "skipped" and resp.headers["X-Rerank-Reason"] == reason
    assert ids(data) == ["1", "2", "3", "4"]
    assert [h["_score"] for h in data["hits"]["hits"]] == [29.0, 28.0, 27.0, 26.0]


async def test_upstream_unreachable_is_502(make_proxy: Factory) -> None:
    client, _ = await make_proxy(upstream_url="http://127.0.0.1:9")  # discard port: nothing listens
    for path in ("/i/_doc/1", "/i/_search?q=x"):
        resp = await client.get(path)
        data = await resp.json()
        assert resp.status == 502 and data["status"] == 502
        assert data["error"]["type"] == "upstream_unavailable_exception"
        assert resp.headers["X-Elastic-Product"] == "Elasticsearch"


async def test_search_upstream_timeout_is_504(make_proxy: Factory) -> None:
    """A search waits upstream.timeout_s (pass-through requests have their own limit: test_relay.py)."""
    client, upstream = await make_proxy(timeout_s=0.3)
    upstream.stall = 2.0
    resp = await client.get("/i/_search?q=x")
    data = await resp.json()
    assert resp.status == 504 and data["error"]["type"] == "upstream_timeout_exception"


async def test_body_over_limit_is_413_and_not_forwarded(make_proxy: Factory) -> None:
    client, upstream = await make_proxy(max_body_bytes=1000)
    resp = await client.post("/_bulk", data=b"x" * 2000, headers={"Content-Type": "application/x-ndjson"})
    data = await resp.json()
    assert resp.status == 413 and data["status"] == 413 and "max_body_bytes" in data["error"]["reason"]

    async def chunks() -> Any:  # no Content-Length: the limit must hold while streaming too
        for _ in range(4):
            yield b"y" * 400

    resp = await client.post("/_bulk", data=chunks())
    assert resp.status == 413
    assert upstream.seen == []


@pytest.mark.parametrize(
    ("path", "headers", "reason"),
    [
        ("/i/_search?format=yaml", {}, "unsupported_format"),
        ("/i/_search", {"Accept": "application/smile"}, "unsupported_format"),
    ],
)
async def test_formats_the_proxy_cannot_rewrite_pass_through(
    make_proxy: Factory, path: str, headers: dict[str, str], reason: str
) -> None:
    scorer = FakeScorer()
    client, upstream = await make_proxy(scorer)
    body = b'{"query": {"match": {"text": "q"}}}'
    resp = await client.post(path, data=body, headers={"Content-Type": "application/json", **headers})
    assert resp.headers["X-Rerank-Reason"] == reason
    assert upstream.seen[-1]["body"] == body and scorer.calls == []


async def test_invalid_json_is_forwarded_verbatim(make_proxy: Factory) -> None:
    client, upstream = await make_proxy()
    resp = await client.post("/i/_search", data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.headers["X-Rerank-Reason"] == "invalid_body"
    assert upstream.seen[-1]["body"] == b"{not json"


async def test_other_requests_keep_flowing_while_the_model_works(make_proxy: Factory) -> None:
    client, _ = await make_proxy(FakeScorer(delay=0.5))
    search = asyncio.create_task(client.post("/i/_search?q=x"))
    await asyncio.sleep(0.1)
    started = asyncio.get_running_loop().time()
    resp = await client.get("/i/_doc/1")
    assert resp.status == 201 and asyncio.get_running_loop().time() - started < 0.4
    assert (await search).headers["X-Rerank-Status"] == "reranked"


async def test_compatible_with_accept_is_mirrored_on_content_type(make_proxy: Factory) -> None:
    client, upstream = await make_proxy()
    media = "application/vnd.elasticsearch+json; compatible-with=8"
    await client.get("/i/_search?q=coffee", headers={"Accept": media})
    assert upstream.seen[-1]["headers"]["Content-Type"] == media
    assert upstream.seen[-1]["method"] == "GET"


async def test_credentials_in_upstream_url_are_a_default(make_proxy: Factory) -> None:
    client, upstream = await make_proxy(upstream_userinfo=("elastic", "s3cret"))
    await client.get("/i/_doc/1")
    assert (
        upstream.seen[-1]["headers"]["Authorization"] == "Basic ZWxhc3RpYzpzM2NyZXQ="
    )  # base64("elastic:s3cret")
    await client.get("/i/_doc/1", headers={"Authorization": "ApiKey abc"})
    assert upstream.seen[-1]["headers"]["Authorization"] == "ApiKey abc"


async def test_upstream_dropping_mid_body_cuts_the_client_connection(make_proxy: Factory) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n0123456789"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(broken, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client, _ = await make_proxy(upstream_url=f"http://127.0.0.1:{port}")
        resp = await client.get("/i/_doc/1")
        assert resp.status == 200  # the status line was already relayed
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
        resp = await client.get("/i/_search?q=x")  # read whole before answering: a clean 502
        assert resp.status == 502
    finally:
        server.close()


class GatedModel:
    """A model without torch for the real queue: the test holds its forward pass at a gate."""

    name, kind, device = "gated", "cross-encoder", "cpu"

    def __init__(self) -> None:
        self.gate, self.entered = threading.Event(), threading.Event()
        self.seen: list[str] = []

    def encode(self, query: str, passages: Sequence[str]) -> tuple[list[str], None]:
        return list(passages), None

    def item_length(self, item: str) -> int:
        return len(item)

    def run_batch(self, batch: list[str]) -> list[float]:
        self.entered.set()
        self.gate.wait(10)
        self.seen.extend(batch)
        return [float(int(p.split()[-1])) for p in batch]

    def reduce(self, results: Sequence[float], plan: None, n: int) -> list[float]:
        return list(results)

    def warm_up(self, max_batch_pairs: int) -> None:
        pass


def gated_scorer(max_queued: int = 1000) -> tuple[GatedModel, EngineScorer]:
    model = GatedModel()
    limits = BatchLimits(max_batch_tokens=4096, max_batch_pairs=64, max_wait_ms=1, max_queued=max_queued)
    return model, EngineScorer(model, limits)


async def test_past_the_queue_bound_a_search_is_answered_in_es_order(make_proxy: Factory) -> None:
    model, scorer = gated_scorer(max_queued=15)
    client, _ = await make_proxy(scorer, top_k=10)
    first = asyncio.create_task(client.post("/i/_search?size=3", json={"query": {"match": {"text": "q"}}}))
    await asyncio.to_thread(model.entered.wait, 5)
    resp = await client.post("/i/_search?size=3", json={"query": {"match": {"text": "q"}}})
    assert resp.headers["X-Rerank-Status"] == "skipped" and resp.headers["X-Rerank-Reason"] == "overloaded"
    assert ids(await resp.json()) == ["0", "1", "2"]
    model.gate.set()
    done = await first
    assert done.headers["X-Rerank-Status"] == "reranked" and ids(await done.json()) == ["9", "8", "7"]
    assert scorer.queue.stats.rejected_jobs == 1
    await scorer.aclose()


async def test_a_client_that_hangs_up_has_its_pairs_dropped(make_proxy: Factory) -> None:
    model, scorer = gated_scorer()
    client, _ = await make_proxy(scorer, top_k=10)
    holder = asyncio.create_task(client.post("/i/_search", json={"query": {"match": {"text": "a"}}}))
    await asyncio.to_thread(model.entered.wait, 5)
    async with aiohttp.ClientSession() as other:
        leaving = asyncio.create_task(
            other.post(client.make_url("/i/_search?size=5"), json={"query": {"match": {"text": "b"}}})
        )
        for _ in range(100):  # until its 10 pairs are queued behind the held batch
            await asyncio.sleep(0.01)
            if scorer.queue.stats.queued == 20:
                break
        assert scorer.queue.stats.queued == 20
        leaving.cancel()  # the client goes away: its connection closes
    for _ in range(100):
        await asyncio.sleep(0.01)
        if scorer.queue.stats.cancelled_items == 10:
            break
    assert scorer.queue.stats.cancelled_items == 10 and scorer.queue.stats.queued == 10
    model.gate.set()
    assert (await holder).headers["X-Rerank-Status"] == "reranked"
    assert len(model.seen) == 10, "the departed client's pairs reached the model"
    await scorer.aclose()


async def test_a_rerank_timeout_frees_the_queue_too(make_proxy: Factory) -> None:
    model, scorer = gated_scorer()
    client, _ = await make_proxy(scorer, top_k=10, timeout_ms=100)
    resp = await client.post("/i/_search?size=2", json={"query": {"match": {"text": "q"}}})
    assert resp.headers["X-Rerank-Reason"] == "rerank_timeout" and ids(await resp.json()) == ["0", "1"]
    assert scorer.queue.stats.queued == 0
    model.gate.set()
    await scorer.aclose()


async def test_judged_searches_track_relevance_of_both_orders(make_proxy: Factory) -> None:
    client, upstream = await make_proxy(top_k=10)
    query = {"match": {"text": "q"}}
    # The fake scorer reverses Elasticsearch's top 10: doc 9 goes from rank 10 to rank 1.
    resp = await client.post("/i/_search?size=3", json={"query": query, "_rerank": {"relevant": ["9"]}})
    assert resp.headers["X-Rerank-Status"] == "reranked" and ids(await resp.json()) == ["9", "8", "7"]
    assert "_rerank" not in orjson.loads(upstream.seen[-1]["body"])
    await client.post("/i/_search", json={"query": query, "_rerank": {"relevant": {"0": 2, "5": 1}}})
    await client.post("/i/_search", json={"query": query})  # unjudged: counted, not tracked
    await client.post("/i/_search", json={"query": query, "sort": ["n"]})  # not reranked
    stats = await admin_stats(client)
    assert stats["searches"] == {"reranked": 3, "skipped": {"sort": 1}}
    rel = stats["relevance"]
    assert rel["judged_searches"] == 2
    # Search 1: MRR 1/10 -> 1. Search 2 (doc 0 grade 2 at rank 1 -> 10, doc 5 grade 1 at 6 -> 5).
    assert rel["original_mrr@10"] == pytest.approx((0.1 + 1.0) / 2)
    assert rel["reranked_mrr@10"] == pytest.approx((1.0 + 1 / 5) / 2)
    ideal = 2 + 1 / math.log2(3)
    original_2 = (2 + 1 / math.log2(7)) / ideal
    reranked_2 = (1 / math.log2(6) + 2 / math.log2(11)) / ideal
    assert rel["original_ndcg@10"] == pytest.approx((1 / math.log2(11) + original_2) / 2)
    assert rel["reranked_ndcg@10"] == pytest.approx((1.0 + reranked_2) / 2)
    assert stats["model"] == "fake"


@pytest.mark.parametrize("bad", [["1", 2], {"1": -1}, {"1": "high"}, "1", {"1": True}])
async def test_malformed_judgements_are_an_es_shaped_400(make_proxy: Factory, bad: Any) -> None:
    client, upstream = await make_proxy()
    resp = await client.post(
        "/i/_search", json={"query": {"match": {"text": "q"}}, "_rerank": {"relevant": bad}}
    )
    data = await resp.json()
    assert resp.status == 400 and "_rerank.relevant" in data["error"]["reason"]
    assert upstream.seen == []


async def test_stats_show_the_queue_of_a_real_engine(make_proxy: Factory) -> None:
    model, scorer = gated_scorer()
    model.gate.set()
    client, _ = await make_proxy(scorer, top_k=10)
    await client.post("/i/_search", json={"query": {"match": {"text": "q"}}})
    stats = await admin_stats(client)
    assert stats["queue"]["items"] == 10 and stats["queue"]["queued"] == 0 and stats["model"] == "gated"
    await scorer.aclose()
