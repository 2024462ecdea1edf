"""Serving the app: aiohttp's HTTP layer, set up once for the command and the tests alike.

``rerank-proxy`` (:func:`run`) and the tests' ``ProxyThread`` (:func:`start`) serve through the same
runner with the same settings, so what the tests see is what users get.

aiohttp answers some requests before any handler runs: a request line, header or body framing its
parser refuses, an error that escapes the app, and HTTP exceptions raised outside the app's
middleware (a target the router cannot match, an unknown ``Expect``). Its own answers are text/plain,
and its log lines quote the offending bytes, header values included. :class:`ProxyRequestHandler`
renders every such answer in Elasticsearch's error shape with ``X-Elastic-Product`` and logs only what
kind of error it was, never the bytes.

Statuses follow Elasticsearch 8.19's for the same raw bytes: every malformed request is a 400, and
the too-long ones carry Elasticsearch's types (``too_long_http_line_exception``,
``too_long_http_header_exception``). Limits: a request line of up to 8190 bytes (Elasticsearch allows
4096 and answers longer ones itself, so they are relayed), a header field of up to 16384 bytes
(Elasticsearch's ``http.max_header_size``: a header Elasticsearch accepts is never refused here).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import HttpVersion10, web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler

from .errors import es_error_body

log = logging.getLogger("proxy")

MAX_LINE_BYTES = 8190  # request line, URL included
MAX_FIELD_BYTES = 16 * 1024  # one header field; Elasticsearch's http.max_header_size
# No header directive: Authorization and ApiKey values must never reach a log.
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'

SETTINGS: dict[str, Any] = {
    # A client that hangs up cancels its handler: its queued pairs and its upstream request go too.
    "handler_cancellation": True,
    "access_log_format": ACCESS_LOG_FORMAT,
    "max_line_size": MAX_LINE_BYTES,
    "max_field_size": MAX_FIELD_BYTES,
}

# aiohttp's own messages that quote nothing the client sent.
_SAFE_MESSAGES = frozenset(
    {
        "Too many headers received",
        "Missing 'Host' header in request.",
        "Received HTTPS traffic on an HTTP port",
    }
)
_FALLBACK_REASONS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (ContentEncodingError, "the request body's Content-Encoding cannot be decoded"),
    (BadHttpMethod, "invalid HTTP method"),
    (BadStatusLine, "invalid HTTP request line"),
    (InvalidURLError, "invalid request target"),
    (InvalidHeader, "invalid HTTP header"),
)


def es_error_response(status: int, es_type: str, reason: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(es_error_body(status, es_type, reason)),
        headers={"Content-Type": "application/json", "X-Elastic-Product": "Elasticsearch"},
    )


def parser_reason(exc: HttpProcessingError) -> str:
    """What was wrong, without the offending bytes.

    llhttp's messages are ``<fixed description>:\\n\\n  <quoted bytes>\\n  <pointer>``: the description
    is kept. Any other message may quote the client's bytes anywhere, so only a few fixed ones are
    kept and the rest are named by the exception's type.
    """
    head, sep, _ = exc.message.partition(":\n\n")
    if sep:
        description = head.splitlines()[-1].strip() if head.strip() else ""
        if description and not any(q in description for q in ("b'", 'b"', "\\")):
            return description
    if exc.message in _SAFE_MESSAGES:
        return exc.message
    for kind, reason in _FALLBACK_REASONS:
        if isinstance(exc, kind):
            return reason
    return "malformed HTTP request"


def quotes_request(exc: BaseException | None) -> bool:
    """Whether ``exc`` or its cause is one of aiohttp's HTTP parser errors, whose text quotes raw
    request bytes (header values included) and so must never be logged."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, HttpProcessingError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


class ProxyRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol, answering its own errors the way Elasticsearch does."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request aiohttp could not parse (400), an error that escaped the app
        (500) or a handler timeout (504). ``message`` is aiohttp's text, never used: it quotes bytes."""
        status, es_type, reason = self._describe(status, exc)
        if isinstance(exc, HttpProcessingError):
            # Port scanners and TLS clients on the plain port hit this first: debug, as aiohttp does.
            first = isinstance(exc, BadHttpMethod) and self._request_count == 1
            level = logging.DEBUG if first else logging.WARNING
            log.log(level, "malformed request from %s -> %d %s: %s", request.remote, status, es_type, reason)
        elif status >= 500:
            shown = None if quotes_request(exc) else exc
            log.error("%s %s -> %d %s", request.method, request.path, status, reason, exc_info=shown)
        if request.writer.output_size > 0:  # the answer has begun: all that is left is to cut it
            raise ConnectionError("the response was already being sent; cannot send an error instead")
        resp = es_error_response(status, es_type, reason)
        resp.force_close()
        return resp

    def _describe(self, status: int, exc: BaseException | None) -> tuple[int, str, str]:
        if isinstance(exc, LineTooLong):  # args: (quoted bytes, the limit crossed, size)
            header = exc.args[1:2] == (self.max_field_size,) and self.max_field_size != self.max_line_size
            if header:
                reason = f"HTTP header is larger than {self.max_field_size} bytes."
                return 400, "too_long_http_header_exception", reason
            reason = f"An HTTP line is larger than {self.max_line_size} bytes."
            return 400, "too_long_http_line_exception", reason
        if isinstance(exc, HttpProcessingError):
            return 400, "illegal_argument_exception", parser_reason(exc)
        if status == HTTPStatus.GATEWAY_TIMEOUT:
            return status, "timeout_exception", "the request timed out in the proxy"
        if status >= 500:
            what = type(exc).__name__ if exc is not None else "unknown error"
            return status, "proxy_exception", f"internal error in the proxy ({what})"
        return status, "illegal_argument_exception", HTTPStatus(status).phrase

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """HTTP exceptions raised outside the app's middleware (a target the router cannot match, an
        unknown ``Expect``) leave in Elasticsearch's shape too, their status and ``Allow`` kept."""
        if isinstance(resp, web.HTTPException) and resp.status >= 400:
            try:
                phrase = HTTPStatus(resp.status).phrase
            except ValueError:
                phrase = "Error"
            es_type = phrase.lower().replace(" ", "_").replace("-", "_") + "_exception"
            answer = es_error_response(resp.status, es_type, phrase)
            if "Allow" in resp.headers:
                answer.headers["Allow"] = resp.headers["Allow"]
            resp = answer
        return await super().finish_response(request, resp, start_time)


class _Server(web.Server):
    """aiohttp's low-level server, making :class:`ProxyRequestHandler` connections."""

    def __call__(self) -> RequestHandler:
        return ProxyRequestHandler(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """``web.AppRunner`` whose connections are :class:`ProxyRequestHandler` (aiohttp has no setting
    for the handler class; the runner's server factory is its one extension point)."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # the app started up, its handler and settings
        app_handler = made.request_handler

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            if request.version < HttpVersion10:
                # aiohttp takes "GET /x" without a version for HTTP/0.9, whose body runs to the end
                # of the connection: the request would hang. Elasticsearch answers 400.
                resp = es_error_response(400, "illegal_argument_exception", "HTTP/0.9 is not supported")
                resp.force_close()
                return resp
            return await app_handler(request)

        return _Server(
            handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **made._kwargs,
        )


async def start(app: web.Application, host: str, port: int) -> web.AppRunner:
    """``app`` served on ``host:port``; stop it with ``await runner.cleanup()``."""
    runner = ProxyRunner(app, **SETTINGS)
    try:
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def run(app: web.Application, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then finish in-flight requests and clean up (the command)."""
    asyncio.run(_serve(app, host, port))


async def _serve(app: web.Application, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = await start(app, host, port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


class WithholdRequestBytes(logging.Filter):
    """On a handler, for every logger in the process (aiohttp.server, asyncio, the proxy's own...):
    a record whose exception is an HTTP parser error keeps its message but loses the exception's
    text and traceback, which quote the raw request bytes, header values included."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if quotes_request(exc):
            withheld = f"[{type(exc).__name__}: details withheld, they quote the request]"
            record.msg = f"{record.getMessage()} {withheld}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def configure_logging(level: str) -> None:
    """The process's logging: one stderr handler, the request-bytes filter on it."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(WithholdRequestBytes())
