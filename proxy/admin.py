"""The admin listener: operations endpoints, served apart from the client-facing port.

The client-facing port answers only Elasticsearch's API; what an operator or an orchestrator asks
(``/_rerank/stats``, and the health and metrics endpoints) is served here, on
``server.admin_host:server.admin_port`` (127.0.0.1 by default, like Envoy's admin port), so a client
that can reach the proxy cannot read its figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from aiohttp import web

__all__ = ["LIFECYCLE_KEY", "Lifecycle", "create_admin_app"]


@dataclass
class Lifecycle:
    """Where the serving process stands: ``ready`` once models are loaded and warmed, ``draining``
    from SIGTERM on (readiness then fails, so a load balancer stops sending new requests)."""

    ready: bool = False
    draining: bool = False


LIFECYCLE_KEY = web.AppKey("lifecycle", Lifecycle)
MAIN_APP_KEY = web.AppKey("main_app", web.Application)


def _json(status: int, body: object) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def handle_live(request: web.Request) -> web.Response:
    """The process is up and its event loop answers."""
    return _json(200, {"status": "live"})


async def handle_stats(request: web.Request) -> web.Response:
    from .app import stats_body

    return _json(200, stats_body(request.app[MAIN_APP_KEY]))


def create_admin_app(main: web.Application) -> web.Application:
    """The admin app for the proxy app ``main``, whose resources it reads."""
    admin = web.Application()
    admin[MAIN_APP_KEY] = main
    admin.router.add_get("/health/live", handle_live)
    admin.router.add_get("/_rerank/stats", handle_stats)
    return admin
