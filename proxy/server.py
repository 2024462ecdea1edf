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
import os
import signal
import sys
from dataclasses import dataclass
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

from .access_log import AccessLog, JsonFormatter, PlainFormatter
from .admin import LIFECYCLE_KEY, create_admin_app
from .config import ServerConfig
from .errors import es_error_body
from .tls import server_tls_context

log = logging.getLogger("proxy")

MAX_LINE_BYTES = 8190  # request line, URL included
MAX_FIELD_BYTES = 16 * 1024  # one header field; Elasticsearch's http.max_header_size

SETTINGS: dict[str, Any] = {
    # A client that hangs up cancels its handler: its queued pairs and its upstream request go too.
    "handler_cancellation": True,
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

    def data_received(self, data: bytes) -> None:
        """aiohttp drops every byte that arrives once a graceful shutdown has begun (its ``close()``
        and ``shutdown()`` flags), so a request whose body was still arriving would wait out the
        shutdown timeout and be cut. The request in flight keeps receiving its body; the connection
        still closes after its answer, and a request pipelined behind it is never started."""
        closing, forced = self._close, self._force_close
        transport = self.transport
        draining = closing or forced
        if draining and self._request_in_progress and transport is not None and not transport.is_closing():
            self._close = self._force_close = False
            try:
                super().data_received(data)
            finally:
                self._close = self._close or closing
                self._force_close = self._force_close or forced
            return
        super().data_received(data)

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
    for the handler class; the runner's server factory is its one extension point). It counts the
    requests in its handlers, so a shutdown can say how many it waited for and how many it cut."""

    in_flight = 0  # requests whose handler is running
    cut = 0  # requests cancelled by a shutdown whose timeout they outlived
    shutting_down = False

    async def cleanup(self) -> None:
        self.shutting_down = True
        await super().cleanup()

    async def _close_when_shutting_down(self, request: web.Request, resp: web.StreamResponse) -> None:
        """An answer begun during a shutdown says ``Connection: close``: its connection closes after
        it, and a client that reused it would see its next request fail."""
        if self.shutting_down:
            resp.force_close()
            resp.headers["Connection"] = "close"  # the hook runs after aiohttp chose this header

    async def _make_server(self) -> web.Server:
        self.app.on_response_prepare.append(self._close_when_shutting_down)
        made = await super()._make_server()  # the app started up, its handler and settings
        app_handler = made.request_handler

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            if request.version < HttpVersion10:
                # aiohttp takes "GET /x" without a version for HTTP/0.9, whose body runs to the end
                # of the connection: the request would hang. Elasticsearch answers 400.
                resp = es_error_response(400, "illegal_argument_exception", "HTTP/0.9 is not supported")
                resp.force_close()
                return resp
            self.in_flight += 1
            try:
                return await app_handler(request)
            except asyncio.CancelledError:
                if self.shutting_down:
                    self.cut += 1
                raise
            finally:
                self.in_flight -= 1

        return _Server(
            handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **made._kwargs,
        )


class ListenError(Exception):
    """A listener that could not open: its address, the option that sets it, and the system's
    reason (address in use, a port that needs privileges, a host that does not resolve)."""


@dataclass
class Serving:
    """The app's listeners: the client-facing one and, when ``server.admin_port`` is not 0, the admin
    one. :meth:`cleanup` is the graceful shutdown, for the command's signals and the tests alike."""

    app: web.Application
    runner: ProxyRunner
    admin: web.AppRunner | None
    shutdown_timeout_s: float

    @property
    def admin_port(self) -> int | None:
        """The admin listener's bound port (the tests ask for a free one), ``None`` when it is off."""
        if self.admin is None:
            return None
        return int(self.admin.addresses[0][1])

    def drain(self) -> None:
        """Readiness fails from now on: a load balancer stops sending before the port closes."""
        lifecycle = self.app.get(LIFECYCLE_KEY)
        if lifecycle is not None:
            lifecycle.draining = True

    async def cleanup(self) -> None:
        """Stop accepting on the client port at once (new connections are refused), let the requests
        in flight finish for up to ``shutdown_timeout_s`` (then they are cancelled and their
        connections cut), close the app's resources (the model queue, the upstream pool), and close
        the admin listener last, so readiness answers "draining" throughout."""
        self.drain()
        in_flight = self.runner.in_flight
        if in_flight:
            log.info(
                "shutting down: %d request(s) in flight, waiting up to %gs",
                in_flight,
                self.shutdown_timeout_s,
            )
        try:
            await self.runner.cleanup()
        finally:
            if self.runner.cut:
                log.warning(
                    "shut down with %d request(s) unfinished after server.shutdown_timeout_s=%gs",
                    self.runner.cut,
                    self.shutdown_timeout_s,
                )
            if self.admin is not None:
                await self.admin.cleanup()


async def _listen(site: web.TCPSite, host: str, port: int, key: str) -> None:
    try:
        await site.start()
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port} ({key}): {exc.strerror or exc}") from None


async def start(app: web.Application, host: str, port: int, server: ServerConfig | None = None) -> Serving:
    """``app`` served on ``host:port``, with ``server``'s TLS, access log, shutdown timeout and admin
    listener (``None``: plain http, no admin listener). Stop it with ``await serving.cleanup()``.

    The TLS context and the admin listener come first, before the app's start-up loads its models:
    a bad key or a busy admin port ends start-up in a second, not after a model download, and
    ``/health/live`` answers (``/health/ready`` does not yet) while the model loads. Raises
    :class:`ConfigError` for the TLS files and :class:`ListenError` for an address."""
    server = server if server is not None else ServerConfig(admin_port=0, access_log=True)
    ssl_context = server_tls_context(server)
    access: dict[str, Any] = {"access_log_class": AccessLog}
    if not server.access_log:
        access["access_log"] = None
    # 0 would be "wait forever" to aiohttp; 1 ms is "do not wait", which is what 0 means here.
    timeout = max(server.shutdown_timeout_s, 0.001)
    runner = ProxyRunner(app, shutdown_timeout=timeout, **access, **SETTINGS)
    admin: web.AppRunner | None = None
    try:
        if server.admin_port:
            admin = web.AppRunner(create_admin_app(app), access_log=None, shutdown_timeout=timeout)
            await admin.setup()
            site = web.TCPSite(admin, server.admin_host, server.admin_port)
            await _listen(site, server.admin_host, server.admin_port, "server.admin_port")
        lifecycle = app.get(LIFECYCLE_KEY)
        if lifecycle is not None:
            lifecycle.accepting = False  # ready only once the client port below listens
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await _listen(site, host, port, "server.port")
        if lifecycle is not None:
            lifecycle.accepting = True
    except BaseException:
        await runner.cleanup()
        if admin is not None:
            await admin.cleanup()
        raise
    return Serving(app, runner, admin, server.shutdown_timeout_s)


def run(app: web.Application, server: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully (:meth:`Serving.cleanup`).

    Stopped during start-up, the process exits at once: a model may still be loading on its thread,
    and finalizing the interpreter under torch's running threads aborts it ("terminate called
    without an active exception"). Nothing was served, so there is nothing left to finish."""
    if not asyncio.run(_serve(app, server)):
        logging.shutdown()  # the log lines said so far are written before the exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


async def _serve(app: web.Application, server: ServerConfig) -> bool:
    """Whether start-up completed (False: a signal stopped it first)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    serving: Serving | None = None

    starting = asyncio.ensure_future(start(app, server.host, server.port, server))

    def on_signal(number: int) -> None:
        name = signal.Signals(number).name
        if serving is None and not starting.done():
            # Nothing is served yet, so nothing is lost: stop now rather than after a model load or
            # download that may take minutes (the loading thread is a daemon, not waited for).
            log.info("%s during start-up: stopping without waiting for the models", name)
            starting.cancel()
        else:
            if serving is not None:
                serving.drain()  # at once, not after the next loop iteration
            if not stop.is_set():
                log.info("%s: draining", name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        serving = await starting
    except asyncio.CancelledError:
        if not stop.is_set():
            raise
        log.info("stopped")
        return False
    if stop.is_set():  # a signal between start-up's end and this line
        serving.drain()
    log.info("serving: %s", ", ".join(_describe_sites(serving)))
    try:
        await stop.wait()
    finally:
        await serving.cleanup()
        log.info("stopped")
    return True


def _describe_sites(serving: Serving) -> list[str]:
    names = [site.name for site in serving.runner.sites]
    if serving.admin is not None:
        names += [f"admin {site.name}" for site in serving.admin.sites]
    return names


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


def configure_logging(level: str, log_format: str = "plain") -> None:
    """The process's logging: one stderr handler, plain or JSON (``server.log_format``), the
    request-bytes filter on it.

    With JSON, lines that would bypass it are routed through it too: Python's warnings, and the
    transformers library's own stderr handler (it stops propagating to the root logger when it is
    imported). Its progress bars are not log lines and are turned off."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else PlainFormatter())
    handler.addFilter(WithholdRequestBytes())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if log_format == "json":
        logging.captureWarnings(True)
        _adopt_library_loggers()


def _adopt_library_loggers() -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency; a plain proxy may lack it
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
