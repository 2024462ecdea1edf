"""The admin listener: liveness, readiness (lifecycle and Elasticsearch's reachability), the stats and
the metrics, served apart from the client-facing port.

The upstream is a scripted aiohttp app, so a test can count how often readiness asks it and can take it
away; readiness against the real Elasticsearch (whose integ-test zip answers ``GET /`` with 405) is
checked at the end.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.admin import LIFECYCLE_KEY, UpstreamCheck, create_admin_app
from proxy.app import create_app
from proxy.config import Config, RerankConfig, UpstreamConfig

from .conftest import ProxyThread, free_port
from .servers import http

Client = TestClient[web.Request, web.Application]


class FakeScorer:
    name = "fake"

    async def score(self, query: str, passages: Any) -> list[float]:
        return [float(len(p)) for p in passages]

    async def aclose(self) -> None:
        pass


class Cluster:
    """A scripted Elasticsearch that answers ``GET /`` with 405, as the integ-test distribution does."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def handler(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        if request.path == "/":
            return web.json_response({"error": "Incorrect HTTP method"}, status=405)
        return web.json_response({"acknowledged": True})


Factory = Callable[..., Awaitable[tuple[Client, Client, web.Application]]]


@pytest.fixture
async def make_admin() -> AsyncIterator[Factory]:
    """The proxy app started in front of ``upstream_url`` (a scripted cluster by default), a client
    of its client-facing port and one of its admin app."""
    made: list[Any] = []

    async def make(
        cluster: Cluster | None = None, upstream_url: str | None = None, check: UpstreamCheck | None = None
    ) -> tuple[Client, Client, web.Application]:
        if upstream_url is None:
            up = web.Application()
            up.router.add_route("*", "/{tail:.*}", (cluster or Cluster()).handler)
            up_server = TestServer(up)
            await up_server.start_server()
            made.append(up_server)
            upstream_url = str(up_server.make_url("")).rstrip("/")
        cfg = Config(upstream=UpstreamConfig(url=upstream_url, timeout_s=5), rerank=RerankConfig())
        app = create_app(cfg, scorer=FakeScorer())
        client = TestClient(TestServer(app))
        await client.start_server()
        made.append(client)
        admin = TestClient(TestServer(create_admin_app(app, check)))
        await admin.start_server()
        made.append(admin)
        return client, admin, app

    yield make
    for item in reversed(made):
        await item.close()


async def test_live_answers_while_the_process_runs(make_admin: Factory) -> None:
    _, admin, _ = await make_admin()
    resp = await admin.get("/health/live")
    assert resp.status == 200 and await resp.json() == {"status": "live"}


async def test_ready_when_started_and_elasticsearch_answers_even_405(make_admin: Factory) -> None:
    cluster = Cluster()
    _, admin, _ = await make_admin(cluster)
    resp = await admin.get("/health/ready")
    assert resp.status == 200 and await resp.json() == {"status": "ready"}
    assert cluster.paths == ["/"]


async def test_not_ready_while_draining(make_admin: Factory) -> None:
    cluster = Cluster()
    _, admin, app = await make_admin(cluster)
    app[LIFECYCLE_KEY].draining = True
    resp = await admin.get("/health/ready")
    body = await resp.json()
    assert resp.status == 503 and body["status"] == "not_ready" and body["reason"] == "draining"
    assert cluster.paths == [], "a draining proxy need not ask Elasticsearch"


async def test_not_ready_before_start_up_has_finished(make_admin: Factory) -> None:
    _, admin, app = await make_admin()
    app[LIFECYCLE_KEY].ready = False  # as while the models load
    resp = await admin.get("/health/ready")
    assert resp.status == 503 and (await resp.json())["reason"] == "starting"


async def test_not_ready_when_elasticsearch_is_unreachable(make_admin: Factory) -> None:
    _, admin, _ = await make_admin(upstream_url=f"http://127.0.0.1:{free_port()}")
    resp = await admin.get("/health/ready")
    body = await resp.json()
    assert resp.status == 503 and body["reason"] == "upstream_unreachable"
    assert "cannot reach Elasticsearch" in body["detail"]


async def test_the_upstream_answer_is_cached_between_probes(make_admin: Factory) -> None:
    cluster = Cluster()
    check = UpstreamCheck(ttl_s=3600)
    _, admin, _ = await make_admin(cluster, check=check)
    for _ in range(3):
        assert (await admin.get("/health/ready")).status == 200
    assert check.asked == 1 and cluster.paths == ["/"]


async def test_an_expired_answer_is_asked_again(make_admin: Factory) -> None:
    cluster = Cluster()
    check = UpstreamCheck(ttl_s=0)
    _, admin, _ = await make_admin(cluster, check=check)
    for _ in range(2):
        assert (await admin.get("/health/ready")).status == 200
    assert check.asked == 2 and cluster.paths == ["/", "/"]


async def test_stats_are_served_on_the_admin_port_only(make_admin: Factory) -> None:
    cluster = Cluster()
    client, admin, _ = await make_admin(cluster)
    stats = await (await admin.get("/_rerank/stats")).json()
    assert stats["model"] == "fake" and stats["searches"] == {"reranked": 0, "skipped": {}}
    # The client-facing port relays the path to Elasticsearch like any other.
    resp = await client.get("/_rerank/stats")
    assert await resp.json() == {"acknowledged": True} and cluster.paths[-1] == "/_rerank/stats"


async def test_metrics_are_prometheus_text(make_admin: Factory) -> None:
    client, admin, _ = await make_admin()
    await client.get("/_cluster/health")
    resp = await admin.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await resp.text()
    assert (
        'rerank_proxy_requests_total{outcome="none",reason="none",route="passthrough",status="2xx"} 1.0'
        in text
    )
    info = (
        'model_info{backend="unknown",device="none",dtype="none",kind="unknown",model="default",name="fake"}'
    )
    assert f"rerank_proxy_{info} 1.0" in text
    openmetrics = await admin.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await openmetrics.text()).endswith("# EOF\n")


@pytest.mark.integration
def test_ready_against_the_real_elasticsearch(proxy: ProxyThread) -> None:
    status, _, raw = http(proxy.admin_url + "/health/ready")
    assert status == 200 and json.loads(raw) == {"status": "ready"}
