"""The one module that talks to Elasticsearch.

It owns the pooled ``aiohttp.ClientSession`` and is the only place that sees aiohttp's client
exceptions: they leave as :class:`UpstreamUnavailable` (502) or :class:`UpstreamTimeout` (504) with
the cause kept, or as the proxy's own error when the client's streamed body was refused on the way up
(:class:`BodyTooLarge`, an undecodable body). Cancellation is never swallowed. Bodies are relayed as
bytes, never re-encoded, and responses are not decompressed, so pass-through answers are byte-for-byte
Elasticsearch's.

Only the configured Elasticsearch is ever asked: a request contributes a path and a query string,
never a scheme, host, port or user (:meth:`Upstream._url`).

Time limits: a search (anything the proxy must read) has ``upstream.timeout_s`` for the whole answer.
A pass-through request has ``upstream.passthrough_timeout_s``, no limit by default: ``_reindex``,
``_forcemerge`` or a large ``_bulk`` legitimately take longer than any search, and a 504 there makes
clients retry work Elasticsearch is still doing. The client's own timeout still ends such a request:
when it hangs up, the handler is cancelled and the upstream request with it.
"""

from __future__ import annotations

import base64
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .config import UpstreamConfig, mask_url
from .errors import ProxyError, UpstreamTimeout, UpstreamUnavailable
from .request_record import note_upstream

Body = bytes | AsyncIterable[bytes] | None
UPSTREAM_MAX_FIELD_BYTES = 64 * 1024  # one header line of Elasticsearch's answers, at most

# RFC 9110 7.6.1 hop-by-hop headers, plus those the HTTP stacks on either side recompute.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)


@dataclass
class UpstreamResponse:
    """A fully read upstream answer (used where the proxy must look inside the body)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


def forwardable(
    headers: Mapping[str, str] | Iterable[tuple[str, str]], drop: Iterable[str] = ()
) -> CIMultiDict[str]:
    """Headers minus hop-by-hop ones and any named in ``drop`` (case-insensitive), order kept.

    Hop-by-hop means the fixed list above and, per RFC 9110 7.6.1, every field the message's own
    ``Connection`` header names (``Connection: close, X-Secret-Hop``), in either direction.
    """
    items = list(headers.items() if isinstance(headers, Mapping) else headers)
    named = {
        token.strip(" \t").lower()
        for key, value in items
        if key.lower() == "connection"
        for token in value.split(",")
    }
    skip = HOP_BY_HOP | named | {d.lower() for d in drop}
    return CIMultiDict((k, v) for k, v in items if k.lower() not in skip)


class Upstream:
    """Pooled client for one Elasticsearch URL; create inside a running loop, close with ``close``."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        url = URL(cfg.url)
        # Credentials in upstream.url are a default for clients that send none of their own: a
        # client's Authorization header always wins and goes up untouched.
        self._default_auth = basic_auth(url.user or "", url.password or "") if url.user is not None else None
        self.base = str(url.with_user(None)).rstrip("/")
        # Where every request goes: only its path and query string come from the client.
        self._scheme, self._host, self._port = url.scheme, url.host_subcomponent or "", url.explicit_port
        self._prefix = url.raw_path.rstrip("/")  # Elasticsearch behind a path, e.g. https://host/es
        self._cfg = cfg
        self._passthrough_timeout = aiohttp.ClientTimeout(
            total=cfg.passthrough_timeout_s or None, sock_connect=cfg.connect_timeout_s
        )
        ssl_ctx: ssl.SSLContext | bool = True
        if cfg.url.startswith("https"):
            if not cfg.verify_certs:
                ssl_ctx = False
            elif cfg.ca_certs:
                ssl_ctx = ssl.create_default_context(cafile=cfg.ca_certs)
        connector = aiohttp.TCPConnector(limit=cfg.max_connections, ssl=ssl_ctx)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=cfg.timeout_s, sock_connect=cfg.connect_timeout_s),
            auto_decompress=False,  # relay content-encoding untouched
            # Forward only what the client sent: no default User-Agent, Accept or Accept-Encoding.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
            # Elasticsearch echoes request headers (X-Opaque-Id, up to its 16 KB) and sends long
            # Warning headers: aiohttp's 8190-byte default would turn its answer into a 502.
            max_line_size=UPSTREAM_MAX_FIELD_BYTES,
            max_field_size=UPSTREAM_MAX_FIELD_BYTES,
        )

    def __repr__(self) -> str:
        return f"Upstream({mask_url(self.base)!r})"

    async def close(self) -> None:
        await self.session.close()

    def _url(self, path_qs: str) -> URL:
        """The configured Elasticsearch plus the request's path and query, nothing else of it.

        Built from parts, never by joining strings: a path such as ``//evil:1/x`` or ``@evil/x`` stays
        a path. ``encoded=True``: the client's percent-encoding goes up byte for byte, never
        re-normalised, and empty segments (``//idx``) are kept.
        """
        path, _, query = path_qs.partition("?")
        if not path.startswith("/"):
            path = "/" + path
        return URL.build(
            scheme=self._scheme,
            host=self._host,
            port=self._port,
            path=self._prefix + path,
            query_string=query,
            encoded=True,
        )

    @contextmanager
    def _translated(self, doing: str, passthrough: bool) -> Iterator[None]:
        """aiohttp's client errors as the proxy's own; cancellation (a BaseException) passes.

        When sending the client's streamed body failed because the proxy refused the body itself (over
        ``server.max_body_bytes``, undecodable), aiohttp reports a connection error caused by that
        refusal: the refusal is what the client gets.
        """
        started, error = time.perf_counter(), None
        try:
            yield
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            error = "timeout"
            key, limit = (
                ("passthrough_timeout_s", self._cfg.passthrough_timeout_s)
                if passthrough
                else ("timeout_s", self._cfg.timeout_s)
            )
            if not limit:  # no total limit: only connecting can have timed out
                key, limit = "connect_timeout_s", self._cfg.connect_timeout_s
            raise UpstreamTimeout(f"Elasticsearch did not answer within {limit}s (upstream.{key})") from exc
        except aiohttp.ClientError as exc:
            refused = _proxy_cause(exc)
            if refused is not None:
                raise refused from exc
            error = "unavailable"
            raise UpstreamUnavailable(f"{doing}: {_why(exc)}") from exc
        finally:  # the request's record: time waiting for Elasticsearch, and how it failed
            note_upstream(time.perf_counter() - started, error)

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        body: Body,
        *,
        passthrough: bool = False,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The upstream response once its headers are in, for relaying without reading it all.

        ``body`` may be an async iterable, sent as it is produced; if it raises a
        :class:`ProxyError` the upstream request is aborted (never completed with a truncated body)
        and that error is raised here, or from :meth:`relay_chunks` when the answer had already
        begun. ``passthrough`` selects the pass-through time limit instead of the search one.

        Only the upstream operations are translated: an error raised by the caller's block (a
        client that went away mid-relay, say) is never mistaken for Elasticsearch's.
        """
        if self._default_auth is not None and "Authorization" not in headers:
            headers = CIMultiDict(headers)
            headers["Authorization"] = self._default_auth
        with self._translated(f"cannot reach Elasticsearch at {mask_url(self.base)}", passthrough):
            resp = await self.session.request(
                method,
                self._url(path_qs),
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=self._passthrough_timeout if passthrough else self.session.timeout,
            )
        if resp.status >= 500 or resp.status == 429:
            note_upstream(0.0, "http_429" if resp.status == 429 else "http_5xx")
        try:
            yield resp
        finally:
            resp.release()

    async def request(
        self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes | None
    ) -> UpstreamResponse:
        async with self.stream(method, path_qs, headers, body) as resp:
            with self._translated("Elasticsearch dropped the connection", passthrough=False):
                data = await resp.read()
            return UpstreamResponse(resp.status, resp.headers, data)

    async def reachable(self, timeout_s: float) -> str | None:
        """None when Elasticsearch answers ``GET /`` within ``timeout_s`` with any HTTP status (the
        integ-test distribution's 405, a 401 without credentials: each proves it is there), else why
        not. For the admin listener's readiness check; the answer's body is never read."""
        headers = CIMultiDict[str]()
        if self._default_auth is not None:
            headers["Authorization"] = self._default_auth
        try:
            async with self.session.get(
                self._url("/"),
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ):
                return None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return f"Elasticsearch at {mask_url(self.base)} did not answer within {timeout_s}s"
        except aiohttp.ClientError as exc:
            return f"cannot reach Elasticsearch at {mask_url(self.base)}: {_why(exc)}"

    async def relay_chunks(
        self, resp: aiohttp.ClientResponse, *, passthrough: bool = False
    ) -> AsyncIterator[bytes]:
        """The response body as it arrives; read errors translated like connect errors."""
        while True:
            with self._translated("Elasticsearch dropped the connection", passthrough):
                chunk = await resp.content.read(64 * 1024)
            if not chunk:
                return
            yield chunk


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _why(exc: BaseException) -> str:
    """A loggable description. Never the text of aiohttp's HTTP parser errors: they quote the raw
    bytes of the offending line, which may be a header such as Set-Cookie or WWW-Authenticate."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"its answer is not valid HTTP ({type(exc).__name__})"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "its answer's body was cut short or malformed"
    text: Any = getattr(exc, "os_error", None) or exc
    return str(text) or type(exc).__name__


def _proxy_cause(exc: BaseException) -> ProxyError | None:
    """The proxy's own refusal behind an aiohttp error, if any (see :meth:`Upstream._translated`)."""
    seen: BaseException | None = exc.__cause__
    while seen is not None:
        if isinstance(seen, ProxyError):
            return seen
        seen = seen.__cause__
    return None
