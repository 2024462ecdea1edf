"""The one module that talks to Elasticsearch.

It owns the pooled ``aiohttp.ClientSession`` and is the only place that sees aiohttp's client
exceptions: they leave as :class:`UpstreamUnavailable` (502) or :class:`UpstreamTimeout` (504) with
the cause kept. Cancellation is never swallowed. Bodies are relayed as bytes, never re-encoded, and
responses are not decompressed, so pass-through answers are byte-for-byte Elasticsearch's.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .config import UpstreamConfig, mask_url
from .errors import UpstreamTimeout, UpstreamUnavailable

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
    """Headers minus hop-by-hop ones and any named in ``drop`` (case-insensitive), order kept."""
    skip = HOP_BY_HOP | {d.lower() for d in drop}
    items = headers.items() if isinstance(headers, Mapping) else headers
    return CIMultiDict((k, v) for k, v in items if k.lower() not in skip)


class Upstream:
    """Pooled client for one Elasticsearch URL; create inside a running loop, close with ``close``."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        url = URL(cfg.url)
        # Credentials in upstream.url are a default for clients that send none of their own: a
        # client's Authorization header always wins and goes up untouched.
        self._default_auth = basic_auth(url.user or "", url.password or "") if url.user is not None else None
        self.base = str(url.with_user(None)).rstrip("/")
        self._cfg = cfg
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
        )

    def __repr__(self) -> str:
        return f"Upstream({mask_url(self.base)!r})"

    async def close(self) -> None:
        await self.session.close()

    def _url(self, path_qs: str) -> URL:
        # encoded=True: the client's percent-encoding goes up byte for byte, never re-normalised.
        return URL(self.base + path_qs, encoded=True)

    @contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        """aiohttp's client errors as the proxy's own; cancellation (a BaseException) passes."""
        try:
            yield
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(f"Elasticsearch did not answer within {self._cfg.timeout_s}s") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"{doing}: {_why(exc)}") from exc

    @asynccontextmanager
    async def stream(
        self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes | None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The upstream response once its headers are in, for relaying without reading it all.

        Only the upstream operations are translated: an error raised by the caller's block (a
        client that went away mid-relay, say) is never mistaken for Elasticsearch's.
        """
        if self._default_auth is not None and "Authorization" not in headers:
            headers = CIMultiDict(headers)
            headers["Authorization"] = self._default_auth
        with self._translated(f"cannot reach Elasticsearch at {mask_url(self.base)}"):
            resp = await self.session.request(
                method, self._url(path_qs), headers=headers, data=body, allow_redirects=False
            )
        try:
            yield resp
        finally:
            resp.release()

    async def request(
        self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes | None
    ) -> UpstreamResponse:
        async with self.stream(method, path_qs, headers, body) as resp:
            with self._translated("Elasticsearch dropped the connection"):
                data = await resp.read()
            return UpstreamResponse(resp.status, resp.headers, data)

    async def relay_chunks(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The response body as it arrives; read errors translated like connect errors."""
        while True:
            with self._translated("Elasticsearch dropped the connection"):
                chunk = await resp.content.read(64 * 1024)
            if not chunk:
                return
            yield chunk


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _why(exc: BaseException) -> str:
    text: Any = getattr(exc, "os_error", None) or exc
    return str(text) or type(exc).__name__
