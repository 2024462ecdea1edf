"""HTTP routing: which handler answers a request, and the one place errors become answers.

Searches go to the search pipeline (:mod:`proxy.search`); every other request is relayed as-is
(:mod:`proxy.relay`). Every answer the proxy makes up itself is Elasticsearch-shaped JSON, rendered in
:func:`error_middleware` from the types in :mod:`proxy.errors`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from .admin import LIFECYCLE_KEY, Lifecycle
from .config import DEFAULT_MODEL, Config
from .errors import ProxyError, es_error_body
from .metrics import METRICS_KEY, Metrics, record_middleware
from .models import close_models, load_models
from .outcome import REASON_HEADER, STATUS_HEADER, TOOK_HEADER
from .relay import read_body, relay_streamed
from .scorer import Scorer
from .search import SearchPipeline
from .search_plan import search_endpoint
from .stats import ProxyStats
from .upstream import Upstream

__all__ = ["REASON_HEADER", "STATUS_HEADER", "TOOK_HEADER", "create_app", "stats_body"]

log = logging.getLogger("proxy")

CONFIG_KEY = web.AppKey("config", Config)
UPSTREAM_KEY = web.AppKey("upstream", Upstream)
SCORERS_KEY = web.AppKey("scorers", dict[str, Scorer])  # by model name; DEFAULT_MODEL is rerank's
STATS_KEY = web.AppKey("stats", ProxyStats)
SEARCH_KEY = web.AppKey("search", SearchPipeline)


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


def stats_body(app: web.Application) -> dict[str, Any]:
    """``GET /_rerank/stats`` on the admin listener: the counters, the default model's name and queue
    at the top (as before several models could be loaded), and every loaded model's under ``models``."""
    scorers = app.get(SCORERS_KEY, {})
    scorer = scorers.get(DEFAULT_MODEL)
    body = app[STATS_KEY].snapshot(_queue_stats(scorer))
    body["model"] = getattr(scorer, "name", None)
    body["models"] = {
        name: {"model": getattr(each, "name", None), "queue": _queue_stats(each, as_dict=True)}
        for name, each in scorers.items()
    }
    return body


def _queue_stats(scorer: Scorer | None, as_dict: bool = False) -> Any:
    """A local model's queue figures (a remote model has no queue here: None)."""
    stats = getattr(getattr(scorer, "queue", None), "stats", None)
    if stats is None or not as_dict:
        return stats
    return ProxyStats.queue_figures(stats)


def create_app(
    cfg: Config, scorer: Scorer | None = None, scorers: Mapping[str, Scorer] | None = None
) -> web.Application:
    """The proxy app. Tests inject fakes in place of the configured models: ``scorer`` as the default
    model, ``scorers`` by model name (both given: ``scorer`` is the default)."""
    # The record middleware is outermost: it sees the answer the error middleware renders.
    app = web.Application(middlewares=[record_middleware, error_middleware])  # body limit: read_body
    app[CONFIG_KEY] = cfg
    app[STATS_KEY] = stats = ProxyStats()
    app[METRICS_KEY] = Metrics(lambda: app.get(SCORERS_KEY, {}), lambda: stats.shadow)
    app[LIFECYCLE_KEY] = Lifecycle()

    async def resources(app: web.Application) -> AsyncIterator[None]:
        own = scorer is None and scorers is None
        loaded: dict[str, Scorer] = dict(scorers or {})
        if scorer is not None:
            loaded[DEFAULT_MODEL] = scorer
        if own:  # every model a search can reach; none when reranking is off everywhere
            loaded = await load_models(cfg.models_in_use())
        app[SCORERS_KEY] = loaded
        # After the models: a model that fails to load must not leave an unclosed client session.
        app[UPSTREAM_KEY] = Upstream(cfg.upstream)
        app[SEARCH_KEY] = SearchPipeline(cfg, app[UPSTREAM_KEY], loaded, app[STATS_KEY])
        app[LIFECYCLE_KEY].ready = True
        try:
            yield
        finally:
            app[LIFECYCLE_KEY].ready = False
            await app[SEARCH_KEY].aclose()
            await app[UPSTREAM_KEY].close()
            if own:
                await close_models(loaded)

    app.cleanup_ctx.append(resources)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
