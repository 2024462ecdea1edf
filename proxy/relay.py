"""The pass-through edge: reading a request, choosing what goes up, streaming the answer back.

Every request that is not a reranked search, and every search the proxy decides not to rerank, leaves
through :func:`relay`: method, target, body and end-to-end headers go up; status, headers and body
come back streamed, byte for byte.
"""

from __future__ import annotations

import logging
from urllib.parse import unquote_plus

from aiohttp import web
from multidict import CIMultiDict

from .errors import BodyTooLarge, ProxyError
from .upstream import Upstream, UpstreamResponse, forwardable

log = logging.getLogger("proxy")


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


def request_headers(request: web.Request, drop: tuple[str, ...] = ()) -> CIMultiDict[str]:
    """Headers to forward. aiohttp's server has already decoded a gzip/deflate request body, so the
    bytes go up as identity and their Content-Encoding must not."""
    return forwardable(request.headers, drop=("Content-Encoding", *drop))


def upstream_target(request: web.Request) -> str:
    """The path and query string to ask Elasticsearch for, exactly as the client encoded them."""
    return request.raw_path


def without_params(target: str, drop: frozenset[str]) -> str:
    """The target minus the named query parameters, other bytes untouched."""
    path, sep, query = target.partition("?")
    if not sep:
        return path
    kept = [p for p in query.split("&") if p and unquote_plus(p.split("=", 1)[0]) not in drop]
    return path + ("?" + "&".join(kept) if kept else "")


async def relay(
    upstream: Upstream,
    request: web.Request,
    body: bytes | None,
    headers: CIMultiDict[str],
    extra: dict[str, str] | None = None,
) -> web.StreamResponse:
    """Forward as-is and stream Elasticsearch's answer back, status and headers included."""
    async with upstream.stream(request.method, upstream_target(request), headers, body) as resp:
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


def buffered(resp: UpstreamResponse, extra: dict[str, str]) -> web.Response:
    """An upstream answer the proxy has read whole, sent on unchanged with ``extra`` headers."""
    out = forwardable(resp.headers)
    out.update(extra)
    return web.Response(status=resp.status, body=resp.body, headers=out)
