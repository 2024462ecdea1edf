"""The pass-through edge: reading a request, choosing what goes up, streaming the answer back.

Every request that is not a reranked search, and every search the proxy decides not to rerank, leaves
through :func:`relay`: method, target, body and end-to-end headers go up; status, headers and body
come back streamed, byte for byte.

Bodies: only a search body is read whole (:func:`read_body`), because the proxy must parse it. Any
other body (``_bulk``, documents, ``_reindex``...) is streamed up as it arrives
(:func:`relay_streamed`), so the proxy holds a few chunks of it at a time, never all of it.
``server.max_body_bytes`` bounds both: a declared length over it is refused before anything goes up,
and a streamed body that crosses it aborts the upstream request, which never sees a complete body.

Content-Encoding: aiohttp's server decodes gzip and deflate bodies itself, so such a body goes up as
identity without its Content-Encoding; one it cannot decode is a 400 (Elasticsearch itself just
closes the connection). An encoding the server leaves alone (``x-gzip``, an unknown one) goes up
with its header, for Elasticsearch to decode or refuse as it would directly.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from urllib.parse import unquote_plus

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from multidict import CIMultiDict

from .errors import BadRequest, BodyTooLarge, ProxyError
from .upstream import Body, Upstream, UpstreamResponse, forwardable

log = logging.getLogger("proxy")

_DECODED = ("gzip", "deflate", "br", "zstd")  # the codings aiohttp's server may decode


def _too_large(limit: int, declared: int | None = None) -> BodyTooLarge:
    if declared is not None:
        return BodyTooLarge(f"request body is {declared} bytes; the limit is {limit} (server.max_body_bytes)")
    return BodyTooLarge(f"request body exceeds {limit} bytes (server.max_body_bytes)")


def _check_declared(request: web.Request, limit: int) -> None:
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(limit, declared)


async def _read_chunk(request: web.Request) -> bytes:
    """The next bytes of the body (``b""`` at its end); a body aiohttp cannot decode or de-chunk is
    the client's error, answered 400 (the reason never quotes the client's bytes or headers)."""
    try:
        return await request.content.readany()
    except web.RequestPayloadError as exc:
        if isinstance(exc.__cause__, ContentEncodingError):
            coding = request.headers.get("Content-Encoding", "").lower()
            named = coding if coding in _DECODED else "its Content-Encoding"
            raise BadRequest(f"the request body cannot be decoded as {named}") from exc
        raise BadRequest("the request body is malformed (its chunked encoding or length)") from exc


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes before reading it all."""
    _check_declared(request, limit)
    chunks, size = [], 0
    while chunk := await _read_chunk(request):
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _streamed(request: web.Request, limit: int, first: bytes) -> AsyncIterator[bytes]:
    """The rest of the body after ``first``, as it arrives. Raising here (over the limit, undecodable)
    makes the upstream client abort its request: Elasticsearch never gets a complete, truncated body."""
    size = len(first)
    if first:
        yield first
    while chunk := await _read_chunk(request):
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        yield chunk


def body_is_decoded(request: web.Request) -> bool:
    """Whether aiohttp's server is decoding this body (it records the compressed size only then)."""
    return getattr(request.content, "total_compressed_bytes", None) is not None  # None: no body


def request_headers(request: web.Request, drop: tuple[str, ...] = ()) -> CIMultiDict[str]:
    """Headers to forward. A body aiohttp's server decoded goes up as identity, so its
    Content-Encoding must not; any other Content-Encoding goes up with the bytes it describes."""
    coding = ("Content-Encoding",) if body_is_decoded(request) else ()
    return forwardable(request.headers, drop=(*coding, *drop))


def upstream_target(request: web.Request) -> str:
    """The path and query string to ask Elasticsearch for, exactly as the client encoded them.

    Origin-form (``/idx/_search?q=x``) is used as sent, empty segments included (``//idx``). Of an
    absolute-form target (``http://es:9200/idx/_search?q=x``, sent by clients that use the proxy as
    an HTTP proxy) only the path and query are kept: a request never chooses the host, which is
    ``upstream.url``'s. Any other form (``host:port`` of CONNECT) is refused.
    """
    raw = request.raw_path
    if raw.startswith("/"):
        return raw
    scheme, sep, rest = raw.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        ends = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
        target = rest[min(ends) :] if ends else ""
        return target if target.startswith("/") else "/" + target
    raise BadRequest("the request target must be a path or an absolute http(s) URL")


def without_params(target: str, drop: frozenset[str]) -> str:
    """The target minus the named query parameters, other bytes untouched."""
    path, sep, query = target.partition("?")
    if not sep:
        return path
    kept = [p for p in query.split("&") if p and unquote_plus(p.split("=", 1)[0]) not in drop]
    return path + ("?" + "&".join(kept) if kept else "")


async def relay_streamed(upstream: Upstream, request: web.Request, limit: int) -> web.StreamResponse:
    """A pass-through request, its body streamed up as it arrives under the pass-through time limit.

    The first chunk is read before Elasticsearch is contacted, so a body refused at once (undecodable)
    never opens an upstream request. A body the server does not decode keeps its declared length, so
    Elasticsearch gets the same framing the client sent; a decoded one goes up chunked.
    """
    upstream_target(request)  # an unusable target is refused before the body is touched
    _check_declared(request, limit)
    headers = request_headers(request)
    body: Body = None
    if request.body_exists:
        first = await _read_chunk(request)
        if len(first) > limit:
            raise _too_large(limit)
        body = _streamed(request, limit, first)
        if request.content_length is not None and not body_is_decoded(request):
            headers["Content-Length"] = str(request.content_length)
    return await relay(upstream, request, body, headers, passthrough=True)


async def relay(
    upstream: Upstream,
    request: web.Request,
    body: Body,
    headers: CIMultiDict[str],
    extra: dict[str, str] | None = None,
    *,
    passthrough: bool = False,
) -> web.StreamResponse:
    """Forward as-is and stream Elasticsearch's answer back, status and headers included.

    ``passthrough`` applies ``upstream.passthrough_timeout_s`` instead of the search limit.
    """
    target = upstream_target(request)
    async with upstream.stream(request.method, target, headers, body, passthrough=passthrough) as resp:
        out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=forwardable(resp.headers))
        for key, value in (extra or {}).items():
            out.headers[key] = value
        if resp.content_length is not None:
            out.content_length = resp.content_length
        await out.prepare(request)
        if request.method != "HEAD":
            try:
                async for chunk in upstream.relay_chunks(resp, passthrough=passthrough):
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
