"""HTTP routing: which handler answers a request, and the one place errors become answers.

Searches go to the search pipeline (:mod:`proxy.search`); every other request is relayed as-is
(:mod:`proxy.relay`). Every answer the proxy makes up itself is Elasticsearch-shaped JSON, rendered in
:func:`error_middleware` from the types in :mod:`proxy.errors`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from .config import Config
from .errors import ProxyError, es_error_body
from .outcome import REASON_HEADER, STATUS_HEADER, TOOK_HEADER
from .relay import read_body, relay_streamed
from .scorer import Scorer, load_scorer
from .search import SearchPipeline
from .search_plan import search_endpoint
from .stats import ProxyStats
from .upstream import Upstream

__all__ = ["REASON_HEADER", "STATUS_HEADER", "TOOK_HEADER", "create_app"]

log = logging.getLogger("proxy")

CONFIG_KEY = web.AppKey("config", Config)
UPSTREAM_KEY = web.AppKey("upstream", Upstream)
SCORER_KEY = web.AppKey("scorer", Scorer)
STATS_KEY = web.AppKey("stats", ProxyStats)
SEARCH_KEY = web.AppKey("search", SearchPipeline)
STATS_PATH = "/_rerank/stats"  # Elasticsearch has no API under /_rerank


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProxyError as exc:
        log.warning("%s %s -> %d %s", request.method, request.path, exc.status, exc.reason)
        return json_response(exc.status, es_error_body(exc.status, exc.es_type, exc.reason))


def json_response(status: int, body: Any, headers: CIMultiDict[str] | None = None) -> web.Response:
    out = CIMultiDict(headers or {})
    out.setdefault("Content-Type", "application/json")
    out.setdefault("X-Elastic-Product", "Elasticsearch")
    return web.Response(status=status, body=orjson.dumps(body), headers=out)


async def handle(request: web.Request) -> web.StreamResponse:
    cfg = request.app[CONFIG_KEY]
    endpoint = search_endpoint(request.method, request.path)
    if endpoint is None:  # pass-through: the body is streamed up, never held whole
        return await relay_streamed(request.app[UPSTREAM_KEY], request, cfg.server.max_body_bytes)
    body = await read_body(request, cfg.server.max_body_bytes)
    return await request.app[SEARCH_KEY].handle(request, body, endpoint)


async def handle_stats(request: web.Request) -> web.Response:
    scorer = request.app.get(SCORER_KEY)
    queue = getattr(getattr(scorer, "queue", None), "stats", None)
    body = request.app[STATS_KEY].snapshot(queue)
    body["model"] = getattr(scorer, "name", None)
    return json_response(200, body)


def create_app(cfg: Config, scorer: Scorer | None = None) -> web.Application:
    """The proxy app; ``scorer`` replaces the configured model (tests inject fakes here)."""
    app = web.Application(middlewares=[error_middleware])  # body limit: read_body, streaming
    app[CONFIG_KEY] = cfg
    app[STATS_KEY] = ProxyStats()

    async def resources(app: web.Application) -> AsyncIterator[None]:
        own = scorer is None and cfg.rerank.enabled
        if scorer is not None:
            app[SCORER_KEY] = scorer
        elif cfg.rerank.enabled:  # disabled in config means a plain proxy: no model is loaded
            app[SCORER_KEY] = await load_scorer(cfg.rerank)
        # After the model: a model that fails to load must not leave an unclosed client session.
        app[UPSTREAM_KEY] = Upstream(cfg.upstream)
        app[SEARCH_KEY] = SearchPipeline(cfg, app[UPSTREAM_KEY], app.get(SCORER_KEY), app[STATS_KEY])
        try:
            yield
        finally:
            await app[SEARCH_KEY].aclose()
            await app[UPSTREAM_KEY].close()
            if own:
                await app[SCORER_KEY].aclose()

    app.cleanup_ctx.append(resources)
    app.router.add_get(STATS_PATH, handle_stats)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
