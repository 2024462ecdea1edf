"""The access log: one line per request with the request's record, never a header, a body or a query
value; and the process's log lines as JSON objects, the request-bytes filter still applied."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Iterator

import orjson
import pytest
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.test_utils import TestServer, make_mocked_request

from proxy.access_log import ACCESS_FIELDS, AccessLog, JsonFormatter, PlainFormatter, logged_target
from proxy.app import create_app
from proxy.config import Config, RerankConfig, ServerConfig, UpstreamConfig
from proxy.request_record import RECORD_KEY, RequestRecord
from proxy.server import WithholdRequestBytes, start

from .conftest import free_port
from .raw_http import exchange, request

SECRET = "s3cr3t-t0ken-value"


@pytest.mark.parametrize(
    ("target", "logged"),
    [
        ("/i/_search", "/i/_search"),
        (f"/i/_search?q={SECRET}&size=3", "/i/_search?q&size"),
        (f"/i/_search?q=a&q={SECRET}&pretty", "/i/_search?q&pretty"),
        ("/caf%C3%A9/_doc/1?", "/caf%C3%A9/_doc/1"),
    ],
)
def test_target_keeps_parameter_names_not_values(target: str, logged: str) -> None:
    assert logged_target(make_mocked_request("GET", target)) == logged


class Capture(logging.Handler):
    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(formatter)
        self.addFilter(WithholdRequestBytes())
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


@pytest.fixture
def access_capture() -> Iterator[tuple[Capture, Capture]]:
    """Plain and JSON renderings of everything the ``aiohttp.access`` logger writes."""
    logger = logging.getLogger("aiohttp.access")
    plain, json = Capture(PlainFormatter()), Capture(JsonFormatter())
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(plain)
    logger.addHandler(json)
    yield plain, json
    logger.removeHandler(plain)
    logger.removeHandler(json)
    logger.setLevel(level)


def test_line_carries_the_record(access_capture: tuple[Capture, Capture]) -> None:
    plain, json = access_capture
    req = make_mocked_request("POST", f"/i/_search?q={SECRET}", headers={"Authorization": SECRET})
    req[RECORD_KEY] = RequestRecord("search", "skipped", "no_query_text", upstream_ms=12.34, scoring_ms=0.0)
    AccessLog(logging.getLogger("aiohttp.access"), "").log(req, web.Response(status=200), 0.0456)
    assert plain.lines[0].endswith(
        '"POST /i/_search?q" 200 search skipped no_query_text upstream_ms=12.3 scoring_ms=0.0 total_ms=45.6'
    )
    line = orjson.loads(json.lines[0])
    assert {k: line[k] for k in ACCESS_FIELDS if k != "remote"} == {
        "method": "POST",
        "path": "/i/_search?q",
        "status": 200,
        "route": "search",
        "outcome": "skipped",
        "reason": "no_query_text",
        "upstream_ms": 12.3,
        "scoring_ms": 0.0,
        "total_ms": 45.6,
    }
    assert (line["level"], line["logger"]) == ("info", "aiohttp.access")
    assert SECRET not in plain.lines[0] + json.lines[0]


def test_line_without_a_record(access_capture: tuple[Capture, Capture]) -> None:
    """aiohttp's own answers (a malformed request) never reach the app's middleware."""
    plain, json = access_capture
    AccessLog(logging.getLogger("aiohttp.access"), "").log(
        make_mocked_request("GET", "/"), web.Response(status=400), 0.001
    )
    assert plain.lines[0].endswith('"GET /" 400 - - - total_ms=1.0')
    line = orjson.loads(json.lines[0])
    assert line["outcome"] is None and line["upstream_ms"] is None and line["status"] == 400


def test_json_lines_withhold_parser_error_text() -> None:
    """The request-bytes filter works on JSON lines as on plain ones: the message stays, the exception's
    quoted bytes go, and a traceback is one string in one object on one line."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(WithholdRequestBytes())
    logger = logging.getLogger("test.access_log.json")
    logger.addHandler(handler)
    try:
        try:
            raise LineTooLong(f"Bearer {SECRET}".encode(), 8190)
        except LineTooLong:
            logger.error("Error handling request from %s", "127.0.0.1", exc_info=True)
        try:
            raise ValueError("a bug\nover two lines")
        except ValueError:
            logger.exception("unexpected")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    withheld, other = (orjson.loads(line) for line in lines)
    assert "details withheld" in withheld["message"] and "exception" not in withheld
    assert "ValueError: a bug\nover two lines" in other["exception"]
    assert SECRET not in stream.getvalue()


async def _echo(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"ok": True}, headers={"X-Elastic-Product": "Elasticsearch"})


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    server = TestServer(app)
    await server.start_server(access_log=None)  # the same logger: only the proxy's lines count
    yield str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.mark.parametrize("enabled", [True, False])
async def test_served_requests_are_logged_once_without_headers(
    upstream: str, access_capture: tuple[Capture, Capture], enabled: bool
) -> None:
    plain, json = access_capture
    port = free_port()
    cfg = Config(
        server=ServerConfig(port=port, admin_port=0, access_log=enabled),
        upstream=UpstreamConfig(url=upstream),
        rerank=RerankConfig(enabled=False),
    )
    serving = await start(create_app(cfg), "127.0.0.1", port, cfg.server)
    try:
        headers = {"Authorization": f"Bearer {SECRET}", "Cookie": f"sid={SECRET}"}
        raw = request("PUT", f"/i/_doc/1?routing={SECRET}", headers, SECRET.encode())
        answer = await asyncio.to_thread(exchange, port, raw)
        assert answer is not None and answer.status == 200
    finally:
        await serving.cleanup()
    if not enabled:
        assert plain.lines == []
        return
    assert len(plain.lines) == 1 and '"PUT /i/_doc/1?routing" 200' in plain.lines[0]
    assert orjson.loads(json.lines[0])["path"] == "/i/_doc/1?routing"
    assert SECRET not in "".join(plain.lines + json.lines)
