"""HTTP handling: read the request, let the pure modules decide, forward, score, answer.

Every request that is not a reranked search is relayed as-is: method, path, query string, body and
end-to-end headers go up; status, headers and body come back streamed. Searches go through
:mod:`proxy.search_plan` and :mod:`proxy.search_response`. Every answer the proxy makes up itself is
Elasticsearch-shaped JSON, rendered in :func:`error_middleware` from the types in :mod:`proxy.errors`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote_plus

import orjson
from aiohttp import web
from multidict import CIMultiDict

from .batching import QueueFull
from .config import Config
from .errors import BodyTooLarge, ProxyError, RerankFailed, es_error_body
from .scorer import Scorer, load_scorer
from .search_plan import (
    OVERRIDE_HEADERS,
    OVERRIDE_KEY,
    Passthrough,
    RerankPlan,
    is_search_path,
    parse_overrides,
    plan_search,
)
from .search_response import apply_order, candidates, reranked_ids
from .stats import ProxyStats
from .upstream import Upstream, UpstreamResponse, forwardable

log = logging.getLogger("proxy")

CONFIG_KEY = web.AppKey("config", Config)
UPSTREAM_KEY = web.AppKey("upstream", Upstream)
SCORER_KEY = web.AppKey("scorer", Scorer)
STATS_KEY = web.AppKey("stats", ProxyStats)
STATS_PATH = "/_rerank/stats"  # Elasticsearch has no API under /_rerank

STATUS_HEADER = "X-Rerank-Status"  # "reranked" or "skipped"
REASON_HEADER = "X-Rerank-Reason"  # why it was skipped
TOOK_HEADER = "X-Rerank-Took-Ms"  # scoring time of a reranked search
_JSON_TYPES = ("application/json", "application/vnd.elasticsearch+json", "application/x-ndjson")


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        resp = await handler(request)
        status = resp.headers.get(STATUS_HEADER)
        if status is not None:
            request.app[STATS_KEY].outcome(status, resp.headers.get(REASON_HEADER))
        return resp
    except ProxyError as exc:
        log.warning("%s %s -> %d %s", request.method, request.path, exc.status, exc.reason)
        return json_response(exc.status, es_error_body(exc.status, exc.es_type, exc.reason))


def json_response(status: int, body: Any, headers: CIMultiDict[str] | None = None) -> web.Response:
    out = CIMultiDict(headers or {})
    out.setdefault("Content-Type", "application/json")
    out.setdefault("X-Elastic-Product", "Elasticsearch")
    return web.Response(status=status, body=orjson.dumps(body), headers=out)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes before reading it all."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"request body is {declared} bytes; the limit is {limit} (server.max_body_bytes)")
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body exceeds {limit} bytes (server.max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def relay(
    request: web.Request, body: bytes | None, headers: CIMultiDict[str], extra: dict[str, str] | None = None
) -> web.StreamResponse:
    """Forward as-is and stream Elasticsearch's answer back, status and headers included."""
    upstream = request.app[UPSTREAM_KEY]
    async with upstream.stream(request.method, request.path_qs, headers, body) as resp:
        out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=forwardable(resp.headers))
        for key, value in (extra or {}).items():
            out.headers[key] = value
        if resp.content_length is not None:
            out.content_length = resp.content_length
        await out.prepare(request)
        if request.method != "HEAD":
            try:
                async for chunk in upstream.relay_chunks(resp):
                    await out.write(chunk)
            except ProxyError as exc:
                # The status line is already sent: the honest signal left is a cut connection, so
                # the client sees a truncated body rather than a complete-looking wrong one.
                log.warning("%s %s: upstream failed mid-body: %s", request.method, request.path, exc.reason)
                if request.transport is not None:
                    request.transport.abort()
                return out
        await out.write_eof()
        return out


async def handle(request: web.Request) -> web.StreamResponse:
    cfg = request.app[CONFIG_KEY]
    body = await read_body(request, cfg.server.max_body_bytes)
    if is_search_path(request.method, request.path):
        return await handle_search(request, body)
    return await relay(request, body or None, request_headers(request))


def request_headers(request: web.Request, drop: tuple[str, ...] = ()) -> CIMultiDict[str]:
    """Headers to forward. aiohttp's server has already decoded a gzip/deflate request body, so the
    bytes go up as identity and their Content-Encoding must not."""
    return forwardable(request.headers, drop=("Content-Encoding", *drop))


def _skipped(reason: str) -> dict[str, str]:
    return {STATUS_HEADER: "skipped", REASON_HEADER: reason}


def _wants_json(request: web.Request) -> bool:
    fmt = request.query.get("format")
    if fmt is not None and fmt.lower() != "json":
        return False
    accept = request.headers.get("Accept", "")
    return not accept or "*/*" in accept or any(t in accept for t in _JSON_TYPES)


async def handle_search(request: web.Request, raw: bytes) -> web.StreamResponse:
    cfg = request.app[CONFIG_KEY]
    headers = request_headers(request, drop=OVERRIDE_HEADERS)
    ctype = request.headers.get("Content-Type", "")
    if not _wants_json(request) or (raw and ctype and not any(t in ctype for t in _JSON_TYPES)):
        return await relay(request, raw or None, headers, _skipped("unsupported_format"))
    try:
        parsed = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):  # let Elasticsearch answer with its own parse error
        return await relay(request, raw or None, headers, _skipped("invalid_body"))

    overrides = parse_overrides(request.headers, parsed)
    had_override = parsed.pop(OVERRIDE_KEY, None) is not None
    plan = plan_search(list(request.query.items()), parsed, cfg.rerank, overrides)
    if isinstance(plan, Passthrough):
        if had_override:
            return await relay(request, orjson.dumps(parsed), headers, _skipped(plan.reason))
        return await relay(request, raw or None, headers, _skipped(plan.reason))
    return await rerank_search(request, plan, headers)


def _upstream_search_headers(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """Headers for the rewritten search: a plain JSON body up, an uncompressed answer down."""
    out = forwardable(headers, drop=("Accept-Encoding", "Content-Type"))
    accept = headers.get("Accept", "")
    # Elasticsearch requires matching compatible-with versions on Accept and Content-Type.
    out["Content-Type"] = accept if "compatible-with" in accept else "application/json"
    return out


async def rerank_search(
    request: web.Request, plan: RerankPlan, headers: CIMultiDict[str]
) -> web.StreamResponse:
    upstream = request.app[UPSTREAM_KEY]
    path_qs = without_params(request.raw_path, plan.dropped_params)
    resp = await upstream.request(
        request.method, path_qs, _upstream_search_headers(headers), orjson.dumps(plan.body)
    )
    try:
        data = orjson.loads(resp.body) if resp.status == 200 else None
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        return _raw(resp, _skipped("upstream_status" if resp.status != 200 else "unreadable_response"))

    started = time.perf_counter()
    extra: dict[str, str]
    try:
        scores = await _score(request.app[SCORER_KEY], plan, candidates(data, plan), request.app[CONFIG_KEY])
        extra = {STATUS_HEADER: "reranked"}
    except RerankFailed as exc:
        log.warning("reranking skipped (%s): %s", exc.reason, exc)
        scores, extra = None, _skipped(exc.reason)
    extra[TOOK_HEADER] = f"{(time.perf_counter() - started) * 1000:.1f}"
    if scores is not None and plan.relevant is not None:
        _track_relevance(request.app[STATS_KEY], plan.relevant, data, plan, scores)
    out = forwardable(resp.headers, drop=("Content-Encoding",))
    out.update(extra)
    return web.Response(status=200, body=orjson.dumps(apply_order(data, plan, scores)), headers=out)


async def _score(scorer: Scorer, plan: RerankPlan, texts: list[str], cfg: Config) -> list[float] | None:
    """Scores for the candidates; any failure becomes :class:`RerankFailed` so the search survives."""
    if not texts:
        return []
    try:
        scores = await asyncio.wait_for(scorer.score(plan.query, texts), cfg.rerank.timeout_ms / 1000)
    except TimeoutError as exc:
        raise RerankFailed("rerank_timeout", f"scoring took over {cfg.rerank.timeout_ms} ms") from exc
    except QueueFull as exc:
        raise RerankFailed("overloaded", str(exc)) from exc
    except Exception as exc:  # the model is third-party code: any failure falls back to ES order
        raise RerankFailed("rerank_error", f"{type(exc).__name__}: {exc}") from exc
    if len(scores) != len(texts):
        raise RerankFailed("rerank_error", f"scorer returned {len(scores)} scores for {len(texts)} passages")
    return scores


def _track_relevance(
    stats: ProxyStats, qrels: dict[str, int], data: dict[str, Any], plan: RerankPlan, scores: list[float]
) -> None:
    original, reranked = reranked_ids(data, plan, scores)
    try:
        figures = stats.relevance.record(qrels, original, reranked)
    except ValueError as exc:  # e.g. one _id from two indices: the ranking is not a ranking of ids
        log.info("relevance not tracked for this search: %s", exc)
        return
    log.debug("judged search: %s", figures)


async def handle_stats(request: web.Request) -> web.Response:
    scorer = request.app.get(SCORER_KEY)
    queue = getattr(getattr(scorer, "queue", None), "stats", None)
    body = request.app[STATS_KEY].snapshot(queue)
    body["model"] = getattr(scorer, "name", None)
    return json_response(200, body)


def without_params(raw_path: str, drop: frozenset[str]) -> str:
    """The raw path and query string minus the named parameters, other bytes untouched."""
    path, sep, query = raw_path.partition("?")
    if not sep:
        return path
    kept = [p for p in query.split("&") if p and unquote_plus(p.split("=", 1)[0]) not in drop]
    return path + ("?" + "&".join(kept) if kept else "")


def _raw(resp: UpstreamResponse, extra: dict[str, str]) -> web.Response:
    out = forwardable(resp.headers)
    out.update(extra)
    return web.Response(status=resp.status, body=resp.body, headers=out)


def create_app(cfg: Config, scorer: Scorer | None = None) -> web.Application:
    """The proxy app; ``scorer`` replaces the configured model (tests inject fakes here)."""
    app = web.Application(middlewares=[error_middleware])  # body limit: read_body, streaming
    app[CONFIG_KEY] = cfg
    app[STATS_KEY] = ProxyStats()

    async def resources(app: web.Application) -> AsyncIterator[None]:
        app[UPSTREAM_KEY] = Upstream(cfg.upstream)
        own = scorer is None and cfg.rerank.enabled
        if scorer is not None:
            app[SCORER_KEY] = scorer
        elif cfg.rerank.enabled:  # disabled in config means a plain proxy: no model is loaded
            app[SCORER_KEY] = await load_scorer(cfg.rerank)
        try:
            yield
        finally:
            await app[UPSTREAM_KEY].close()
            if own:
                await app[SCORER_KEY].aclose()

    app.cleanup_ctx.append(resources)
    app.router.add_get(STATS_PATH, handle_stats)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
