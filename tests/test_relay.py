"""The pass-through edge against a scripted upstream: target, hop-by-hop headers, bodies streamed and
bounded, Content-Encoding, time limits, and logs that never hold a request header.

The proxy is served exactly as the command serves it (``proxy.server.start``); the upstream is an
aiohttp app defined in each test, recording what reached it. Behaviour against the real
Elasticsearch is in test_http_edge.py.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.test_utils import TestServer

from proxy.app import create_app
from proxy.config import Config, ConfigError, RerankConfig, ServerConfig, UpstreamConfig
from proxy.config_load import load_config
from proxy.server import WithholdRequestBytes
from proxy.server import start as serve
from proxy.upstream import Upstream, forwardable

from .conftest import free_port
from .raw_http import Answer, assert_es_error, exchange, request

ES = {"X-Elastic-Product": "Elasticsearch"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Stack = Callable[..., Awaitable[tuple[str, int]]]


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    """``await stack(handler, **upstream_options)``: the proxy (rerank disabled) in front of an
    upstream answering with ``handler``; returns the proxy's URL and port."""
    closers: list[Callable[[], Awaitable[None]]] = []

    async def make(handler: Handler, *, max_body_bytes: int = 1 << 20, **upstream: Any) -> tuple[str, int]:
        up = TestServer(_app(handler))
        await up.start_server()
        closers.append(up.close)
        cfg = Config(
            server=ServerConfig(max_body_bytes=max_body_bytes),
            upstream=UpstreamConfig(url=str(up.make_url("")).rstrip("/"), **upstream),
            rerank=RerankConfig(enabled=False),
        )
        port = free_port()
        runner = await serve(create_app(cfg), "127.0.0.1", port)
        closers.append(runner.cleanup)
        return f"http://127.0.0.1:{port}", port

    yield make
    for close in reversed(closers):
        await close()


async def send(port: int, raw: bytes) -> Answer | None:
    return await asyncio.to_thread(exchange, port, raw)


def recorder(seen: list[dict[str, Any]], status: int = 200) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append({"target": request.raw_path, "headers": request.headers.copy(), "body": body})
        return web.json_response({"ok": True}, status=status, headers=ES)

    return handler


# --- the target: path and query only, never a host ----------------------------------------------


@pytest.mark.parametrize(
    ("target", "upstream_sees"),
    [
        ("http://127.0.0.1:1/idx/_doc/1?routing=a%2Cb", "/idx/_doc/1?routing=a%2Cb"),
        ("http://evil.invalid:1/idx/_search?q=berlin", "/idx/_search?q=berlin"),  # a search
        ("https://user:pw@evil.invalid:1/a/b?c", "/a/b?c"),
        ("HTTP://evil.invalid:1/?x=1", "/?x=1"),
        ("//evil.invalid:1/x", "//evil.invalid:1/x"),
        ("//user@evil.invalid/x?y", "//user@evil.invalid/x?y"),
        ("/@evil.invalid:1/x", "/@evil.invalid:1/x"),
    ],
)
async def test_a_request_never_chooses_the_upstream_host(
    stack: Stack, target: str, upstream_sees: str
) -> None:
    """Absolute-form targets (``curl --proxy``) used to answer 500; crafted paths must stay paths.
    Everything reaches the configured upstream, whose recording proves where it went."""
    seen: list[dict[str, Any]] = []
    _, port = await stack(recorder(seen))
    answer = await send(port, request("GET", target))
    assert answer is not None and answer.status == 200, answer
    # The search pipeline may ask the upstream other things first (GET /): the request itself is last.
    assert seen[-1]["target"] == upstream_sees


async def test_a_target_that_is_not_a_path_is_refused_in_elasticsearch_shape(stack: Stack) -> None:
    seen: list[dict[str, Any]] = []
    _, port = await stack(recorder(seen))
    assert_es_error(await send(port, request("GET", "@evil.invalid/x")), 400)  # aiohttp's parser refuses
    assert_es_error(await send(port, request("OPTIONS", "*")), 404)  # the router matches no path
    assert seen == []


async def test_answers_aiohttp_makes_itself_have_elasticsearch_shape() -> None:
    """An error escaping the app and an unknown ``Expect`` were aiohttp's text/plain answers."""

    async def broken(request: web.Request) -> web.StreamResponse:
        raise RuntimeError("a bug, not the client's fault")

    app = _app(broken)
    port = free_port()
    runner = await serve(app, "127.0.0.1", port)
    try:
        error = assert_es_error(await send(port, request("GET", "/x")), 500, "proxy_exception")
        assert "RuntimeError" in error["reason"]
        expect = request("POST", "/x", {"Expect": "something-else"}, b"{}")
        assert_es_error(await send(port, expect), 417)
    finally:
        await runner.cleanup()


async def test_upstream_url_is_built_from_parts() -> None:
    upstream = Upstream(UpstreamConfig(url="http://u:p@127.0.0.1:9250/es/"))
    try:
        for path_qs in ("//evil:1/x?y=%20", "@evil:1/x", "/a%2Fb//c"):
            url = upstream._url(path_qs)
            assert (url.host, url.port, url.user) == ("127.0.0.1", 9250, None), url
            assert url.raw_path_qs.startswith("/es/"), url
        assert upstream._url("//idx/_search?q=%20a+b").raw_path_qs == "/es//idx/_search?q=%20a+b"
    finally:
        await upstream.close()


# --- hop-by-hop headers named in Connection (item 11) -------------------------------------------


def test_forwardable_drops_what_connection_names() -> None:
    headers = [
        ("Connection", "close ,  X-Secret-Hop,x-OTHER-hop"),
        ("X-Secret-Hop", "s"),
        ("x-other-hop", "o"),
        ("Keep-Alive", "timeout=5"),
        ("X-Kept", "k"),
        ("Authorization", "ApiKey a"),
    ]
    assert list(forwardable(headers).items()) == [("X-Kept", "k"), ("Authorization", "ApiKey a")]


async def test_headers_named_in_connection_are_dropped_both_ways(stack: Stack) -> None:
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append({"headers": request.headers.copy()})
        return web.Response(
            text="ok",
            headers={**ES, "Connection": "X-Resp-Hop", "X-Resp-Hop": "r", "X-Resp-Kept": "k"},
        )

    _, port = await stack(handler)
    raw = request(
        "GET", "/idx/_doc/1", {"Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "s", "X-Kept": "k"}
    )
    raw = raw.replace(b"Connection: close\r\n", b"")
    answer = await send(port, raw)
    assert answer is not None and answer.status == 200
    sent = seen[0]["headers"]
    assert sent["X-Kept"] == "k" and "X-Secret-Hop" not in sent
    assert answer.headers["X-Resp-Kept"] == "k" and "X-Resp-Hop" not in answer.headers


# --- time limits: searches vs pass-through (item 19) --------------------------------------------


def slow(seconds: float) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(seconds)
        return web.json_response({"took": int(seconds * 1000), "total": 1}, headers=ES)

    return handler


async def test_relayed_request_longer_than_the_search_timeout_completes(stack: Stack) -> None:
    """``_reindex``/``_forcemerge``/a large ``_bulk`` used to get 504 after upstream.timeout_s while
    Elasticsearch kept working; by default pass-through requests have no total limit."""
    url, _ = await stack(slow(1.0), timeout_s=0.2)

    async def post(session: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        async with session.post(url + path, data=b"{}\n", headers=headers) as r:
            return r.status, await r.json()

    async with aiohttp.ClientSession() as session:
        paths = ("/_reindex?wait_for_completion=true", "/idx/_forcemerge", "/_bulk", "/idx/_search")
        answers = dict(zip(paths, await asyncio.gather(*(post(session, p) for p in paths)), strict=True))
    for path in paths[:3]:
        assert answers[path][0] == 200, (path, answers[path])
    status, body = answers["/idx/_search"]
    assert status == 504  # searches keep upstream.timeout_s
    assert body["error"]["type"] == "upstream_timeout_exception"
    assert "upstream.timeout_s" in body["error"]["reason"]


async def test_passthrough_timeout_when_configured(stack: Stack) -> None:
    url, _ = await stack(slow(1.0), timeout_s=30, passthrough_timeout_s=0.2)
    async with aiohttp.ClientSession() as session, session.post(url + "/_reindex", json={}) as r:
        assert r.status == 504
        assert "upstream.passthrough_timeout_s" in (await r.json())["error"]["reason"]


def test_passthrough_timeout_config() -> None:
    assert UpstreamConfig().passthrough_timeout_s == 0
    env = {"RERANK_PROXY_UPSTREAM_PASSTHROUGH_TIMEOUT_S": "null"}
    assert load_config(env=env).upstream.passthrough_timeout_s is None
    env = {"RERANK_PROXY_UPSTREAM_PASSTHROUGH_TIMEOUT_S": "3600"}
    assert load_config(env=env).upstream.passthrough_timeout_s == 3600.0
    with pytest.raises(ConfigError, match=r"upstream\.passthrough_timeout_s"):
        UpstreamConfig(passthrough_timeout_s=-1)


# --- bodies: streamed, bounded, decoded (items 20 and 5) ----------------------------------------

BULK_PART = b'{"index":{"_index":"i"}}\n{"text":"streamed passage"}\n' * 3000  # ~150 KB, > one read chunk


async def test_pass_through_body_reaches_upstream_before_the_client_has_sent_it_all(stack: Stack) -> None:
    """The proxy forwards the first part of a body while the client is still sending: it never holds
    the whole body. The client sends its second part only once the upstream has seen the first; a
    proxy that buffered the body would wait for the second part forever."""
    upstream_has_bytes = asyncio.Event()
    received: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        data = b""
        async for chunk in request.content.iter_any():
            data += chunk
            upstream_has_bytes.set()
        received.update(body=data, headers=request.headers.copy())
        return web.json_response({"errors": False}, headers=ES)

    url, _ = await stack(handler, max_body_bytes=4 * len(BULK_PART))

    async def body() -> AsyncIterator[bytes]:
        yield BULK_PART
        await asyncio.wait_for(upstream_has_bytes.wait(), 15)
        yield BULK_PART

    async with aiohttp.ClientSession() as session:
        headers = {"Content-Type": "application/x-ndjson"}
        async with session.post(url + "/_bulk", data=body(), headers=headers) as r:
            assert r.status == 200, await r.text()
    assert received["body"] == BULK_PART * 2


async def test_declared_length_goes_up_with_the_streamed_body(stack: Stack) -> None:
    seen: list[dict[str, Any]] = []
    _, port = await stack(recorder(seen))
    answer = await send(port, request("PUT", "/i/_doc/1", {"Content-Type": "application/json"}, BULK_PART))
    assert answer is not None and answer.status == 200
    assert seen[0]["body"] == BULK_PART
    assert seen[0]["headers"]["Content-Length"] == str(len(BULK_PART))
    assert "Transfer-Encoding" not in seen[0]["headers"]


async def test_body_crossing_the_limit_mid_stream_aborts_the_upstream_request(stack: Stack) -> None:
    """No Content-Length, so the limit is only crossed while streaming: the client gets 413 and the
    upstream request is cut, never completed with a truncated body."""
    outcome: dict[str, Any] = {}
    finished = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        outcome["bytes"] = 0
        try:
            async for chunk in request.content.iter_any():  # like Elasticsearch: the body, then the answer
                outcome["bytes"] += len(chunk)
            outcome["complete"] = True
        except BaseException as exc:  # the connection went away mid-body, or the handler was cancelled
            outcome["error"] = type(exc).__name__
            raise
        finally:
            finished.set()
        return web.json_response({"errors": False}, headers=ES)

    limit = 256 * 1024
    url, _ = await stack(handler, max_body_bytes=limit)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(16):
            yield b"x" * (64 * 1024)

    async with aiohttp.ClientSession() as session, session.post(url + "/_bulk", data=body()) as r:
        assert r.status == 413
        assert (await r.json())["error"]["type"] == "content_too_long_exception"
        assert r.headers["X-Elastic-Product"] == "Elasticsearch"
    await asyncio.wait_for(finished.wait(), 15)
    assert "complete" not in outcome and "error" in outcome, outcome
    assert 0 < outcome["bytes"] < 16 * 64 * 1024, outcome  # a part went up, then the request was cut


async def test_declared_length_over_the_limit_never_reaches_upstream(stack: Stack) -> None:
    seen: list[dict[str, Any]] = []
    _, port = await stack(recorder(seen), max_body_bytes=1024)
    answer = await send(
        port, request("POST", "/_bulk", {"Content-Type": "application/x-ndjson"}, b"x" * 2048)
    )
    assert_es_error(answer, 413, "content_too_long_exception")
    assert seen == []


@pytest.mark.parametrize("coding", ["gzip", "deflate", "GZIP"])
@pytest.mark.parametrize("path", ["/i/_doc/1", "/i/_search"])
async def test_undecodable_body_is_an_elasticsearch_400(stack: Stack, coding: str, path: str) -> None:
    """Used to be aiohttp's text/plain 500. Elasticsearch itself closes the connection without an
    answer (test_http_edge.py); nothing reaches it from the proxy."""
    seen: list[dict[str, Any]] = []
    _, port = await stack(recorder(seen))
    headers = {"Content-Type": "application/json", "Content-Encoding": coding}
    error = assert_es_error(await send(port, request("POST", path, headers, b"this is not compressed")), 400)
    assert "cannot be decoded" in error["reason"]
    assert seen == []


@pytest.mark.parametrize("coding", ["br", "zstd"])
async def test_coding_the_server_cannot_decode_is_an_elasticsearch_400(stack: Stack, coding: str) -> None:
    _, port = await stack(recorder([]))
    headers = {"Content-Type": "application/json", "Content-Encoding": coding}
    assert_es_error(await send(port, request("POST", "/i/_doc/1", headers, b"\x00\x01\x02")), 400)


async def test_decoded_body_goes_up_as_identity_and_other_codings_go_up_as_sent(stack: Stack) -> None:
    seen: list[dict[str, Any]] = []
    _, port = await stack(recorder(seen))
    doc = b'{"text": "compressed"}'
    sent = {
        "gzip": gzip.compress(doc),  # the server decodes it: identity bytes, no Content-Encoding
        "x-gzip": gzip.compress(doc),  # left alone by aiohttp; Elasticsearch decodes it itself
        "snappy-ish": doc,  # unknown: Elasticsearch treats it as identity
    }
    for coding, body in sent.items():
        headers = {"Content-Type": "application/json", "Content-Encoding": coding}
        answer = await send(port, request("PUT", "/i/_doc/1", headers, body))
        assert answer is not None and answer.status == 200
    gz, xgz, unknown = seen
    assert gz["body"] == doc and "Content-Encoding" not in gz["headers"]
    assert xgz["body"] == sent["x-gzip"] and xgz["headers"]["Content-Encoding"] == "x-gzip"
    assert unknown["body"] == doc and unknown["headers"]["Content-Encoding"] == "snappy-ish"


# --- logs never hold a request header (item 14) ---------------------------------------------------

SECRETS = {
    "oversized": "SECRET-OVERSIZED-1f3a",
    "bare-cr": "SECRET-BARE-CR-77c2",
    "nul": "SECRET-NUL-90ab",
    "control": "SECRET-CTRL-5d5d",
    "folded": "SECRET-FOLDED-c0de",
    "cookie": "SECRET-COOKIE-beef",
    "valid": "SECRET-VALID-4242",
    "realm": "SECRET-REALM-a11a",
}


def malformed_requests() -> list[bytes]:
    """Requests aiohttp's parser refuses, each quoting a secret in the bytes it would log."""
    head = b"GET /i/_search HTTP/1.1\r\nHost: es\r\nConnection: close\r\n"
    padding = b"x" * 20_000
    return [
        head + b"Authorization: Bearer " + SECRETS["oversized"].encode() + padding + b"\r\n\r\n",
        head + b"Cookie: sid=" + SECRETS["cookie"].encode() + padding + b"\r\n\r\n",
        head + b"Cookie: sid=" + SECRETS["bare-cr"].encode() + b"\rrest\r\n\r\n",
        head + b"X-Api-Key: " + SECRETS["nul"].encode() + b"\x00tail\r\n\r\n",
        head + b"Authorization: ApiKey " + SECRETS["control"].encode() + b"\x01\r\n\r\n",
        head + b"X-Api-Key: first-line\r\n  " + SECRETS["folded"].encode() + b"\r\n\r\n",
        head + b"X-Api-Key: " + SECRETS["nul"].encode() + b"\r\nAuthorization" + b"\x7f: y\r\n\r\n",
    ]


async def unauthorized(request: web.Request) -> web.StreamResponse:
    """Elasticsearch refusing the credentials, naming its realm."""
    await request.read()
    body = {"error": {"type": "security_exception", "reason": "unable to authenticate"}, "status": 401}
    realm = f'Bearer realm="{SECRETS["realm"]}"'
    return web.json_response(body, status=401, headers={**ES, "WWW-Authenticate": realm})


async def test_logs_never_hold_request_headers(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp's server logged the first ~100 bytes of an oversized header and all of a header with a
    bare CR or a control byte. Every logger, at debug level, in-process."""
    caplog.set_level(logging.DEBUG)
    _, port = await stack(unauthorized)
    for raw in malformed_requests():
        assert_es_error(await send(port, raw), 400)
    valid = {"Authorization": f"Bearer {SECRETS['valid']}", "X-Api-Key": SECRETS["valid"]}
    for method, path in (("GET", "/i/_doc/1"), ("POST", "/i/_search"), ("PUT", "/i/_doc/1")):
        answer = await send(port, request(method, path, {**valid, "Content-Type": "application/json"}, b"{}"))
        assert answer is not None and answer.status == 401
        assert SECRETS["realm"] in answer.headers["WWW-Authenticate"]  # relayed, not logged
    text = caplog.text
    assert "malformed request" in text and "aiohttp.access" in {r.name for r in caplog.records}
    leaked = [name for name, secret in SECRETS.items() if secret in text]
    assert not leaked, leaked


@pytest.mark.slow
async def test_command_logs_never_hold_request_headers(tmp_path: Path) -> None:
    """The same, as users run it: ``rerank-proxy --server-log-level debug``, stderr captured, every
    logger of the process writing to it (the command's logging setup, not the test's)."""
    up = TestServer(_app(unauthorized))
    await up.start_server()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_PROXY_")}
    args = ["--server-log-level", "debug", "--rerank-enabled", "false", "--server-port", str(port)]
    args += ["--server-admin-port", str(free_port())]
    args += ["--upstream", str(up.make_url("")).rstrip("/")]
    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.cli", *args, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            await _until_listening(port, proc)
            for raw in malformed_requests():
                assert_es_error(await send(port, raw), 400)
            valid = {"Authorization": f"Bearer {SECRETS['valid']}", "Cookie": f"sid={SECRETS['valid']}"}
            answer = await send(
                port, request("POST", "/i/_doc", {**valid, "Content-Type": "application/json"}, b"{}")
            )
            assert answer is not None and answer.status == 401
        finally:
            proc.terminate()
            code = await asyncio.wait_for(proc.wait(), 60)
            await up.close()
    text = stderr.read_text(errors="replace")
    assert code == 0, text
    assert "malformed request" in text and "aiohttp.access" in text and "DEBUG" in text, text
    leaked = [name for name, secret in SECRETS.items() if secret in text]
    assert not leaked, leaked


def _app(handler: Handler) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def _until_listening(port: int, proc: asyncio.subprocess.Process) -> None:
    deadline = asyncio.get_running_loop().time() + 120
    while asyncio.get_running_loop().time() < deadline:
        assert proc.returncode is None, "rerank-proxy exited during start-up"
        try:
            await send(port, request("GET", "/"))
            return
        except OSError:
            await asyncio.sleep(0.2)
    raise AssertionError("rerank-proxy did not start listening")


def test_log_filter_withholds_parser_error_text() -> None:
    """The command's handler filter: whichever logger logs an HTTP parser error (aiohttp's own, a
    library's, asyncio's), the quoted request bytes in its text and traceback never get written."""
    secret = SECRETS["oversized"]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(WithholdRequestBytes())
    logger = logging.getLogger("test.withheld")
    logger.addHandler(handler)
    try:
        try:
            try:
                raise LineTooLong(f"Bearer {secret}...".encode(), 8190)
            except LineTooLong as exc:
                raise RuntimeError("wrapped") from exc
        except RuntimeError:
            logger.error("Error handling request from %s", "127.0.0.1", exc_info=True)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "Error handling request from 127.0.0.1" in text and "details withheld" in text
    assert secret not in text
