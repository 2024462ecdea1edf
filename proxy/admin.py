"""The admin listener: operations endpoints, served apart from the client-facing port.

The client-facing port answers only Elasticsearch's API; what an operator or an orchestrator asks
(``/_rerank/stats``, and the health and metrics endpoints) is served here, on
``server.admin_host:server.admin_port`` (127.0.0.1 by default, like Envoy's admin port), so a client
that can reach the proxy cannot read its figures.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from .metrics import METRICS_KEY

if TYPE_CHECKING:
    from .upstream import Upstream

__all__ = ["LIFECYCLE_KEY", "Lifecycle", "UpstreamCheck", "create_admin_app"]


@dataclass
class Lifecycle:
    """Where the serving process stands: ``ready`` once models are loaded and warmed, ``accepting``
    once the client port takes connections (the app's start-up ends a moment before it listens),
    ``draining`` from SIGTERM on (readiness then fails, so a load balancer stops sending new requests).
    ``accepting`` starts true for an app no listener serves (the tests' in-process clients)."""

    ready: bool = False
    accepting: bool = True
    draining: bool = False


@dataclass
class UpstreamCheck:
    """Whether Elasticsearch answers, asked at most once per ``ttl_s`` seconds (an orchestrator
    probing every second must not become load on the cluster, nor a slow cluster slow readiness), with
    ``timeout_s`` for the answer. Concurrent probes share one question."""

    ttl_s: float = 5.0
    timeout_s: float = 2.0
    asked: int = 0  # questions actually sent
    _at: float = -math.inf
    _why: str | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def why_not(self, upstream: Upstream) -> str | None:
        """None when Elasticsearch answered within the last ``ttl_s``, else why it did not."""
        async with self._lock:
            if time.monotonic() - self._at >= self.ttl_s:
                self.asked += 1
                self._why = await upstream.reachable(self.timeout_s)
                self._at = time.monotonic()
            return self._why


LIFECYCLE_KEY = web.AppKey("lifecycle", Lifecycle)
MAIN_APP_KEY = web.AppKey("main_app", web.Application)
CHECK_KEY = web.AppKey("upstream_check", UpstreamCheck)


def _json(status: int, body: object) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def handle_live(request: web.Request) -> web.Response:
    """The process is up and its event loop answers."""
    return _json(200, {"status": "live"})


def _not_ready(reason: str, detail: str) -> web.Response:
    return _json(503, {"status": "not_ready", "reason": reason, "detail": detail})


async def handle_ready(request: web.Request) -> web.Response:
    """Whether this process should be sent requests: started (models loaded and warmed), not
    draining, and Elasticsearch answering. 503 with the reason otherwise: ``starting``, ``draining``
    or ``upstream_unreachable``."""
    from .app import UPSTREAM_KEY

    main = request.app[MAIN_APP_KEY]
    lifecycle = main[LIFECYCLE_KEY]
    if lifecycle.draining:
        return _not_ready("draining", "the proxy is shutting down and finishing its requests")
    upstream = main.get(UPSTREAM_KEY)
    if not (lifecycle.ready and lifecycle.accepting) or upstream is None:
        return _not_ready("starting", "the proxy is loading its models")
    why = await request.app[CHECK_KEY].why_not(upstream)
    if why is not None:
        return _not_ready("upstream_unreachable", why)
    return _json(200, {"status": "ready"})


async def handle_metrics(request: web.Request) -> web.Response:
    """The main app's metrics: Prometheus' text format, or OpenMetrics when the scraper's ``Accept``
    asks for it."""
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encode(request.app[MAIN_APP_KEY][METRICS_KEY].registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def handle_stats(request: web.Request) -> web.Response:
    from .app import stats_body

    return _json(200, stats_body(request.app[MAIN_APP_KEY]))


def create_admin_app(main: web.Application, check: UpstreamCheck | None = None) -> web.Application:
    """The admin app for the proxy app ``main``, whose resources it reads. ``check``: how readiness
    asks Elasticsearch (the default caches its answer 5 s and waits 2 s for it)."""
    admin = web.Application()
    admin[MAIN_APP_KEY] = main
    admin[CHECK_KEY] = check or UpstreamCheck()
    admin.router.add_get("/metrics", handle_metrics)
    admin.router.add_get("/health/live", handle_live)
    admin.router.add_get("/health/ready", handle_ready)
    admin.router.add_get("/_rerank/stats", handle_stats)
    return admin
