"""The HTTP edge against the real Elasticsearch: for the same raw bytes the proxy answers as
Elasticsearch does, in Elasticsearch's shape, and Elasticsearch sees exactly what the client sent.

Every expected status below is Elasticsearch 8.19's own answer to the same bytes, checked on each run
(``es_status``), next to the proxy's. Where they differ it is aiohttp's parser being stricter than
Netty, and the proxy still answers in Elasticsearch's shape.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from yarl import URL

from proxy.config import Config, RerankConfig, UpstreamConfig

from .conftest import ProxyThread
from .raw_http import Answer, assert_es_error, exchange, request

pytestmark = pytest.mark.integration

INDEX = "rerank-http-edge"
CLOSE = b"Connection: close\r\n"
GET = b"GET /" + INDEX.encode() + b"/_search HTTP/1.1\r\nHost: es\r\n" + CLOSE


def port_of(url: str) -> int:
    return URL(url).port or 80


@pytest.fixture(scope="module")
def edge(es_url: str) -> Iterator[tuple[int, int]]:
    """(Elasticsearch's port, the proxy's port): a plain proxy (no model) served as the command
    serves it, and an index with one document."""
    es_port = port_of(es_url)
    exchange(es_port, request("DELETE", f"/{INDEX}"))
    doc = request(
        "PUT", f"/{INDEX}/_doc/1?refresh=true", {"Content-Type": "application/json"}, b'{"text":"berlin"}'
    )
    created = exchange(es_port, doc)
    assert created is not None and created.status == 201, created
    server = ProxyThread(
        Config(upstream=UpstreamConfig(url=es_url, timeout_s=30), rerank=RerankConfig(enabled=False))
    )
    server.start()
    yield es_port, server.port
    server.stop()
    exchange(es_port, request("DELETE", f"/{INDEX}"))


def both(
    edge: tuple[int, int], raw: bytes, proxied: bytes | None = None
) -> tuple[Answer | None, Answer | None]:
    es_port, proxy_port = edge
    return exchange(es_port, raw), exchange(proxy_port, proxied if proxied is not None else raw)


# --- item 13: HTTP-level errors, status as Elasticsearch's, shape always Elasticsearch's -----------

SECRET = b"SECRET-EDGE-0d0d"
CASES: list[tuple[str, bytes, int | None, int, str | None]] = [
    # id, raw request, Elasticsearch's status (None: it accepts it), the proxy's, the proxy's type
    (
        "url-over-8190",
        b"GET /"
        + INDEX.encode()
        + b"/_search?q="
        + b"a" * 10_240
        + b" HTTP/1.1\r\nHost: es\r\n"
        + CLOSE
        + b"\r\n",
        400,
        400,
        "too_long_http_line_exception",
    ),
    (
        "header-over-16k",
        GET + b"Authorization: Bearer " + SECRET + b"s" * 20_000 + b"\r\n\r\n",
        400,
        400,
        "too_long_http_header_exception",
    ),
    (
        "illegal-method-char",
        b"G@T /x HTTP/1.1\r\nHost: es\r\n" + CLOSE + b"\r\n",
        400,
        400,
        "illegal_argument_exception",
    ),
    (
        "no-version-http09",
        b"GET /" + INDEX.encode() + b"/_search\r\nHost: es\r\n" + CLOSE + b"\r\n",
        400,
        400,
        None,
    ),
    ("bad-version", b"GET /x HTTP/9.9\r\nHost: es\r\n" + CLOSE + b"\r\n", 400, 400, None),
    ("tls-on-plain-port", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400, 400, None),
    ("bare-cr-in-value", GET + b"Cookie: sid=" + SECRET + b"\rx\r\n\r\n", 400, 400, None),
    ("nul-in-value", GET + b"X-Api-Key: " + SECRET + b"\x00x\r\n\r\n", 400, 400, None),
    ("control-in-value", GET + b"Authorization: ApiKey " + SECRET + b"\x01\r\n\r\n", 400, 400, None),
    ("space-before-colon", GET + b"X-Api-Key : " + SECRET + b"\r\n\r\n", 400, 400, None),
    ("bad-content-length", GET + b"Content-Length: abc\r\n\r\n", 400, 400, None),
    (
        "length-and-chunked",
        GET + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        400,
        None,
    ),
    ("bad-chunk-size", GET + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400, 400, None),
    # Netty accepts these; aiohttp's parser refuses them (RFC 9112 allows refusing obs-fold).
    ("obs-fold", GET + b"X-Api-Key: a\r\n  " + SECRET + b"\r\n\r\n", None, 400, None),
    ("unknown-method", b"FOO /x HTTP/1.1\r\nHost: es\r\n" + CLOSE + b"\r\n", 405, 400, None),
    ("no-host", b"GET /" + INDEX.encode() + b"/_search HTTP/1.1\r\n" + CLOSE + b"\r\n", None, 400, None),
    ("over-128-headers", GET + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n", None, 400, None),
]


@pytest.mark.parametrize(
    ("raw", "es_status", "status", "es_type"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_http_level_errors_have_elasticsearch_shape(
    edge: tuple[int, int], raw: bytes, es_status: int | None, status: int, es_type: str | None
) -> None:
    """aiohttp's parser used to answer these itself, text/plain, quoting the offending bytes."""
    direct, proxied = both(edge, raw)
    assert direct is not None
    assert direct.status == (es_status if es_status is not None else 200), direct
    error = assert_es_error(proxied, status, es_type)
    assert SECRET.decode() not in orjson.dumps(error).decode()
    if es_type is not None and es_type.startswith("too_long"):
        assert direct.json()["error"]["type"] == es_type  # Elasticsearch's own type for the same bytes


@pytest.mark.parametrize("name", ["X-Large-Token", "X-Opaque-Id"])
def test_header_elasticsearch_accepts_is_relayed(edge: tuple[int, int], name: str) -> None:
    """A 9 KB header (a large JWT, say) is within Elasticsearch's 16 KB, so within the proxy's limit;
    X-Opaque-Id is echoed in Elasticsearch's answer, which the proxy must read too."""
    raw = GET + name.encode() + b": " + b"t" * 9_000 + b"\r\n\r\n"
    direct, proxied = both(edge, raw)
    assert direct is not None and proxied is not None
    assert proxied.status == direct.status
    assert without_took(proxied.json()) == without_took(direct.json())


# --- item 4: absolute-form targets -----------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        f"http://127.0.0.1:9200/{INDEX}/_search?q=berlin",
        f"http://evil.invalid:1/{INDEX}/_doc/1",
        f"https://user:pw@evil.invalid/{INDEX}/_doc/1?_source_includes=text",
    ],
)
def test_absolute_form_goes_to_the_configured_upstream(edge: tuple[int, int], target: str) -> None:
    """``curl --proxy http://proxy:8000 http://es:9200/idx/_search?q=berlin`` used to answer 500.
    Only the path and query are used: the answer is Elasticsearch's to the origin-form request."""
    path = "/" + target.split("/", 3)[3]
    direct, proxied = both(edge, request("GET", path), request("GET", target))
    assert direct is not None and proxied is not None
    assert proxied.status == direct.status == 200, proxied
    assert without_took(proxied.json()) == without_took(direct.json())


def without_took(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "took"}


# --- item 10: the exact path bytes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        f"//{INDEX}/_search",
        f"//{INDEX}/_doc/1",
        f"/{INDEX}//_doc/1",
        f"/{INDEX}/_doc/%31?filter_path=_source",
        f"/{INDEX}/_doc/1?_source_includes=te%78t&pretty",
        f"//{INDEX}/_count?q=text:berlin",
    ],
)
def test_elasticsearch_sees_the_path_the_client_sent(edge: tuple[int, int], target: str) -> None:
    """``//idx/_search`` used to reach Elasticsearch as ``////idx/_search``; Elasticsearch names the
    path it got in its errors, so equal answers mean equal bytes."""
    direct, proxied = both(edge, request("GET", target))
    assert direct is not None and proxied is not None
    assert (proxied.status, proxied.body) == (direct.status, direct.body)


# --- item 5: Content-Encoding of request bodies ----------------------------------------------------


def test_undecodable_gzip_body(edge: tuple[int, int]) -> None:
    """Elasticsearch closes the connection without an answer; the proxy answers 400 in its shape."""
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    direct, proxied = both(edge, request("PUT", f"/{INDEX}/_doc/bad", headers, b"not gzip at all"))
    assert direct is None
    assert_es_error(proxied, 400, "illegal_argument_exception")


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate", "identity", "unknown-coding"])
def test_request_body_codings_as_elasticsearch_reads_them(edge: tuple[int, int], coding: str) -> None:
    """gzip/deflate are decoded by the proxy's server; x-gzip (which Elasticsearch decodes) and
    unknown codings (which it reads as identity) go up as sent, header included."""
    doc = {"text": f"sent as {coding}"}
    raw = orjson.dumps(doc)
    encoded = {"gzip": gzip.compress(raw), "x-gzip": gzip.compress(raw), "deflate": _deflate(raw)}.get(
        coding, raw
    )
    headers = {"Content-Type": "application/json", "Content-Encoding": coding}
    es_port, proxy_port = edge
    for port, doc_id in ((es_port, f"direct-{coding}"), (proxy_port, f"proxied-{coding}")):
        answer = exchange(port, request("PUT", f"/{INDEX}/_doc/{doc_id}?refresh=true", headers, encoded))
        assert answer is not None and answer.status == 201, (port, answer)
        stored = exchange(es_port, request("GET", f"/{INDEX}/_doc/{doc_id}"))
        assert stored is not None and stored.json()["_source"] == doc


def _deflate(data: bytes) -> bytes:
    import zlib

    return zlib.compress(data)


# --- item 20: streamed bodies ------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_large_bulk_goes_through_intact(edge: tuple[int, int], framing: str) -> None:
    """A ~1 MB _bulk (many read chunks) streamed through the proxy: Elasticsearch indexes every doc."""
    es_port, proxy_port = edge
    index = f"{INDEX}-bulk-{framing}"
    docs = 8000
    body = b"".join(
        b'{"index":{"_index":"%s","_id":"%d"}}\n{"text":"passage number %d of a streamed bulk"}\n'
        % (index.encode(), i, i)
        for i in range(docs)
    )
    assert len(body) > 512 * 1024
    target = "/_bulk?refresh=true"
    if framing == "content-length":
        raw = request("POST", target, {"Content-Type": "application/x-ndjson"}, body)
    else:
        chunks = [body[i : i + 50_000] for i in range(0, len(body), 50_000)]
        framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        raw = request(
            "POST", target, {"Content-Type": "application/x-ndjson", "Transfer-Encoding": "chunked"}
        )
        raw += framed
    try:
        answer = exchange(proxy_port, raw, timeout=120)
        assert answer is not None and answer.status == 200, answer
        result = answer.json()
        assert result["errors"] is False and len(result["items"]) == docs
        count = exchange(es_port, request("GET", f"/{index}/_count"))
        assert count is not None and count.json()["count"] == docs
    finally:
        exchange(es_port, request("DELETE", f"/{index}"))
