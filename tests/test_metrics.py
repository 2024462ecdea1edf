"""Metrics: the request record's helpers, the middleware, the per-model collector, and the counters
after real searches through the proxy.

Counters are read from the admin app's ``/metrics`` scrape and compared before and after, so a test
checks exactly what its own requests added.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from elasticsearch import Elasticsearch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin import create_admin_app
from proxy.app import create_app
from proxy.batch_cost import WAIT_BUCKETS_S, BatchLimits, QueueStats
from proxy.batching import BatchQueue
from proxy.config import Config, RerankConfig, UpstreamConfig
from proxy.metrics import METRICS_KEY, REASONS, Metrics, record_middleware, route_kind
from proxy.request_record import (
    RECORD_KEY,
    RequestRecord,
    current,
    note_scoring,
    note_search,
    note_upstream,
    recording,
)
from proxy.scorer import EngineScorer

from .conftest import ProxyThread, free_port
from .corpus import DOCS, index_fixture
from .servers import http

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, /, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# -- the helpers, without sockets ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("POST", "/idx/_search", "search"),
        ("GET", "/_search", "search"),
        ("POST", "/idx/_search/template", "search"),
        ("POST", "/_msearch", "msearch"),
        ("GET", "/a,b/_msearch/template", "msearch"),
        ("PUT", "/idx/_search", "passthrough"),
        ("GET", "/idx/_doc/1", "passthrough"),
        ("GET", "/_rerank/stats", "passthrough"),
    ],
)
def test_route_kind(method: str, path: str, kind: str) -> None:
    assert route_kind(method, path) == kind


def test_a_multi_search_is_reranked_when_any_item_was() -> None:
    record = RequestRecord(route="msearch")
    with recording(record):
        note_search("skipped", "sort")
        note_search("reranked", None)
        note_search("skipped", "size_zero")
    assert (record.outcome, record.reason) == ("reranked", None)
    assert record.searches == [("skipped", "sort"), ("reranked", None), ("skipped", "size_zero")]


def test_a_multi_search_reranked_nowhere_keeps_its_first_reason() -> None:
    record = RequestRecord(route="msearch")
    with recording(record):
        note_search("skipped", "size_zero")
        note_search("skipped", "sort")
    assert (record.outcome, record.reason) == ("skipped", "size_zero")


def test_times_and_errors_go_to_the_current_record_only() -> None:
    record = RequestRecord()
    note_upstream(1.0, "timeout")  # no current record: nothing to write to, no error
    with recording(record):
        assert current() is record
        note_upstream(0.010, None)
        note_upstream(0.005, "http_5xx")
        note_scoring(30.0)
        note_scoring(20.0)  # a concurrent sub-search that finished sooner
    assert current() is None
    assert record.upstream_ms == pytest.approx(15.0) and record.upstream_errors == ["http_5xx"]
    assert record.scoring_ms == 30.0


def test_every_reason_in_the_code_is_in_the_closed_set() -> None:
    """A new reason must be added to REASONS, or it is exported as "other"."""
    literal = re.compile(
        r'(?:skipped|Passthrough|RerankFailed)\(\s*"([a-z_]+)"'  # a reason given where it is decided
        r'|reason(?:: str)? = "([a-z_]+)"'  # an exception's or a plan's own
        r'|[A-Z_]+ = "([a-z_]+)"  # the reason'  # a named one (proxy/rules.py)
    )
    found = {
        name
        for source in (ROOT / "proxy").glob("*.py")
        for match in literal.finditer(source.read_text())
        for name in match.groups()
        if name
    }
    assert {"sort", "rerank_timeout", "deadline", "unsupported_format"} <= found
    assert found <= REASONS, found - REASONS


def test_queue_waits_are_cumulative_buckets_at_scrape_time() -> None:
    stats = QueueStats()
    for seconds in (0.0005, 0.001, 0.003, 100.0):
        stats.record_wait(seconds)
    assert sum(stats.wait_counts) == 4 and stats.wait_counts[-1] == 1
    metrics = Metrics(lambda: {"default": _WithQueue(stats)})
    samples = parse(_scrape(metrics))
    assert value(samples, "rerank_proxy_queue_wait_seconds_bucket", model="default", le="0.001") == 2
    assert value(samples, "rerank_proxy_queue_wait_seconds_bucket", model="default", le="0.005") == 3
    assert value(samples, "rerank_proxy_queue_wait_seconds_bucket", model="default", le="+Inf") == 4
    assert value(samples, "rerank_proxy_queue_wait_seconds_count", model="default") == 4
    assert len(stats.wait_counts) == len(WAIT_BUCKETS_S) + 1


async def test_the_queue_records_each_jobs_wait_once() -> None:
    queue: BatchQueue[int, int] = BatchQueue(
        lambda batch: batch, lambda item: 1, BatchLimits(100, 2, 1.0, 100), name="test"
    )
    try:
        assert await queue.submit([1, 2, 3]) == [1, 2, 3]  # two batches, one job
        assert sum(queue.stats.wait_counts) == 1 and queue.stats.batches == 2
    finally:
        await queue.aclose()


async def test_a_cancelled_request_is_counted_and_leaves_the_in_flight_gauge() -> None:
    app = web.Application()
    app[METRICS_KEY] = Metrics(dict)

    async def hang_up(request: web.Request) -> web.StreamResponse:
        note_search("skipped", "size_zero")
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await record_middleware(make_mocked_request("POST", "/i/_search", app=app), hang_up)
    samples = parse(_scrape(app[METRICS_KEY]))
    labels = {"route": "search", "outcome": "skipped", "reason": "size_zero", "status": "cancelled"}
    assert value(samples, "rerank_proxy_requests_total", **labels) == 1
    assert value(samples, "rerank_proxy_in_flight_requests", route="search") == 0
    assert value(samples, "rerank_proxy_request_duration_seconds_count", route="search") == 1


async def test_turned_off_the_middleware_still_fills_the_record() -> None:
    app = web.Application()
    app[METRICS_KEY] = Metrics(dict)
    app[METRICS_KEY].enabled = False
    request = make_mocked_request("POST", "/_msearch", app=app)

    async def handler(request: web.Request) -> web.StreamResponse:
        note_search("reranked", None)
        return web.Response()

    await record_middleware(request, handler)
    samples = parse(_scrape(app[METRICS_KEY]))
    assert not [k for k in samples if k[0] == "rerank_proxy_requests_total"]
    record = request[RECORD_KEY]
    assert record.route == "msearch" and record.outcome == "reranked"


class _WithQueue:
    name = "q"

    def __init__(self, stats: QueueStats) -> None:
        self.queue = type("Queue", (), {"stats": stats})()


def _scrape(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


# -- through the app, against a scripted cluster -----------------------------------------------------


class Cluster:
    """Answers a search with 5 hits, a multi-search item by item, ``/boom`` with 503."""

    async def handler(self, request: web.Request) -> web.Response:
        headers = {"X-Elastic-Product": "Elasticsearch"}
        if request.path == "/boom":
            return web.json_response({"error": "unavailable"}, status=503, headers=headers)
        hits = [{"_id": str(i), "_score": 5.0 - i, "_source": {"text": f"passage {i}"}} for i in range(5)]
        answer = {"took": 1, "hits": {"total": {"value": 5, "relation": "eq"}, "hits": hits}}
        if request.path.endswith("_msearch"):
            lines = (await request.read()).decode().strip().split("\n")
            return web.json_response({"responses": [answer] * (len(lines) // 2)}, headers=headers)
        if request.path.endswith("_search"):
            return web.json_response(answer, headers=headers)
        return web.json_response({}, status=405 if request.path == "/" else 200, headers=headers)


class CountingModel:
    name, kind, device, dtype = "counting", "cross-encoder", "cpu", "float32"

    def encode(self, query: str, passages: Sequence[str]) -> tuple[list[str], None]:
        return list(passages), None

    def item_length(self, item: str) -> int:
        return len(item.split())

    def run_batch(self, batch: list[str]) -> list[float]:
        return [float(p.split()[-1]) for p in batch]

    def reduce(self, results: Sequence[float], plan: None, n: int) -> list[float]:
        return list(results)

    def warm_up(self, largest: int) -> None:
        pass


@pytest.fixture
async def served() -> AsyncIterator[tuple[TestClient[web.Request, web.Application], Any, EngineScorer]]:
    up = TestServer(web.Application())
    up.app.router.add_route("*", "/{tail:.*}", Cluster().handler)
    await up.start_server()
    scorer = EngineScorer(CountingModel(), BatchLimits(4096, 64, 1.0, 1000), cache_entries=100)
    cfg = Config(upstream=UpstreamConfig(url=str(up.make_url("")).rstrip("/")), rerank=RerankConfig(top_k=5))
    app = create_app(cfg, scorer=scorer)
    client = TestClient(TestServer(app))
    await client.start_server()
    admin = TestClient(TestServer(create_admin_app(app)))
    await admin.start_server()
    try:
        yield client, admin, scorer
    finally:
        await admin.close()
        await client.close()
        await up.close()
        await scorer.aclose()


async def scrape(admin: Any) -> Samples:
    return parse(await (await admin.get("/metrics")).text())


async def test_requests_searches_queue_and_cache_are_counted(served: Any) -> None:
    client, admin, _ = served
    search = {"query": {"match": {"text": "q"}}}
    for _ in range(2):  # the second is answered from the score cache
        assert (await client.post("/i/_search", json=search)).headers["X-Rerank-Status"] == "reranked"
    await client.post("/i/_search", json={**search, "sort": ["n"]})
    lines = b"".join(orjson.dumps(x) + b"\n" for x in ({}, search, {}, {**search, "size": 0}))
    resp = await client.post("/_msearch", data=lines, headers={"Content-Type": "application/x-ndjson"})
    assert resp.headers["X-Rerank-Items"] == "reranked,skipped:size_zero"
    await client.get("/boom")
    s = await scrape(admin)

    def requests(route: str, outcome: str, reason: str, status: str = "2xx") -> float:
        return value(
            s, "rerank_proxy_requests_total", route=route, outcome=outcome, reason=reason, status=status
        )

    assert requests("search", "reranked", "none") == 2
    assert requests("search", "skipped", "sort") == 1
    assert requests("msearch", "reranked", "none") == 1
    assert requests("passthrough", "none", "none", "5xx") == 1
    assert value(s, "rerank_proxy_searches_total", outcome="reranked", reason="none") == 3
    assert value(s, "rerank_proxy_searches_total", outcome="skipped", reason="size_zero") == 1
    assert value(s, "rerank_proxy_upstream_errors_total", kind="http_5xx") == 1
    assert value(s, "rerank_proxy_upstream_errors_total", kind="unavailable") == 0
    assert value(s, "rerank_proxy_request_duration_seconds_count", route="search") == 3
    assert value(s, "rerank_proxy_upstream_duration_seconds_count", route="msearch") == 1
    # Scored: the first search and the multi-search's item; the second search's scores were cached.
    assert value(s, "rerank_proxy_scoring_duration_seconds_count", route="search") == 2
    assert value(s, "rerank_proxy_batch_items_total", model="default") == 5
    assert value(s, "rerank_proxy_score_cache_lookups_total", model="default", result="hit") == 10
    assert value(s, "rerank_proxy_score_cache_lookups_total", model="default", result="miss") == 5
    assert value(s, "rerank_proxy_queue_wait_seconds_count", model="default") == 1
    assert value(s, "rerank_proxy_queue_depth", model="default") == 0
    info = {
        "model": "default",
        "name": "counting",
        "backend": "local",
        "kind": "cross-encoder",
        "device": "cpu",
        "dtype": "float32",
    }
    assert value(s, "rerank_proxy_model_info", **info) == 1
    assert value(s, "rerank_proxy_in_flight_requests", route="search") == 0


async def test_an_unreachable_cluster_is_an_upstream_error() -> None:
    cfg = Config(upstream=UpstreamConfig(url=f"http://127.0.0.1:{free_port()}"), rerank=RerankConfig())
    app = create_app(cfg, scorer=_WithQueue(QueueStats()))  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        assert (await client.post("/i/_search", json={"query": {"match": {"text": "q"}}})).status == 502
        s = parse(_scrape(app[METRICS_KEY]))
    # Two calls failed: the first search's question of which product the cluster is, and the search.
    assert value(s, "rerank_proxy_upstream_errors_total", kind="unavailable") == 2
    labels = {"route": "search", "outcome": "none", "reason": "none", "status": "5xx"}
    assert value(s, "rerank_proxy_requests_total", **labels) == 1


# -- against the real Elasticsearch --------------------------------------------------------------------

INDEX = "rerank-metrics"
MATCH = {"match": {"text": "coffee brewed with water"}}


es = index_fixture((INDEX, DOCS))


def real_scrape(proxy: ProxyThread) -> Samples:
    status, _, raw = http(proxy.admin_url + "/metrics")
    assert status == 200
    return parse(raw.decode())


def post(proxy: ProxyThread, path: str, body: bytes, ctype: str = "application/json") -> dict[str, str]:
    status, headers, _ = http(proxy.url + path, "POST", body, {"Content-Type": ctype})
    assert status == 200
    return headers


@pytest.mark.integration
def test_counters_move_by_exactly_the_requests_made(proxy: ProxyThread, es: Elasticsearch) -> None:
    candidates = es.search(index=INDEX, query=MATCH, size=20)["hits"]["hits"]
    before = real_scrape(proxy)
    for _ in range(3):
        headers = post(proxy, f"/{INDEX}/_search", json.dumps({"query": MATCH, "size": 5}).encode())
        assert headers["x-rerank-status"] == "reranked"
    assert http(f"{proxy.url}/{INDEX}/_doc/{candidates[0]['_id']}")[0] == 200
    lines = "".join(json.dumps(x) + "\n" for x in ({"index": INDEX}, {"query": MATCH}) * 2).encode()
    assert post(proxy, "/_msearch", lines, "application/x-ndjson")["x-rerank-items"] == "reranked,reranked"
    after = real_scrape(proxy)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"reason": "none", "status": "2xx"}
    assert moved("rerank_proxy_requests_total", route="search", outcome="reranked", **ok) == 3
    assert moved("rerank_proxy_requests_total", route="passthrough", outcome="none", **ok) == 1
    assert moved("rerank_proxy_requests_total", route="msearch", outcome="reranked", **ok) == 1
    assert moved("rerank_proxy_searches_total", outcome="reranked", reason="none") == 5
    assert moved("rerank_proxy_request_duration_seconds_count", route="search") == 3
    assert moved("rerank_proxy_request_duration_seconds_count", route="passthrough") == 1
    assert moved("rerank_proxy_upstream_duration_seconds_count", route="msearch") == 1
    assert moved("rerank_proxy_scoring_duration_seconds_count", route="search") == 3
    assert moved("rerank_proxy_batch_items_total", model="default") == 5 * len(candidates)
    assert moved("rerank_proxy_queue_wait_seconds_count", model="default") == 5
    real = moved("rerank_proxy_batch_tokens_total", model="default", kind="real")
    assert 0 < real <= moved("rerank_proxy_batch_tokens_total", model="default", kind="padded")
    assert sum(v for (name, _), v in after.items() if name == "rerank_proxy_upstream_errors_total") == sum(
        v for (name, _), v in before.items() if name == "rerank_proxy_upstream_errors_total"
    )


@pytest.mark.integration
def test_new_index_names_add_no_series(proxy: ProxyThread, es: Elasticsearch) -> None:
    body = json.dumps({"query": MATCH}).encode()

    def search(index: str) -> None:
        http(f"{proxy.url}/{index}/_search", "POST", body, {"Content-Type": "application/json"})
        http(f"{proxy.url}/{index}/_doc/1")

    search("never-seen-index-a")  # may add series of a reason (upstream_rejected_rewrite) seen first now
    first = set(real_scrape(proxy))
    for index in ("never-seen-index-b", "never-seen-index-c", f"{INDEX},never-seen-index-d"):
        search(index)
    after = set(real_scrape(proxy))
    assert after == first
    assert not any("never-seen" in v for _, labels in after for _, v in labels)
