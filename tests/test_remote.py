"""The remote scorer against rerank servers defined here, on loopback: request and answer shapes, how
each failure leaves (and which are retried), chunking, the overload bound, start-up and secrets.

The real server, infinity-emb, is in tests/test_remote_infinity.py; these handlers play the HTTP edge
cases a real server seldom shows on demand.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.batching import QueueFull
from proxy.config import Config, RerankConfig
from proxy.first_run import offline_fallback
from proxy.remote import (
    BackendOverloaded,
    BackendUnavailable,
    RemoteError,
    RemoteScorer,
    open_remote_scorer,
    scores_by_index,
)
from proxy.runtime import ModelLoadError
from proxy.scorer import load_scorer

from .conftest import free_port
from .test_startup_errors import _env, start_up_error

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
KEY = "sk-test-9f8e7d6c5b4a"


class Server:
    """A rerank server on loopback whose answers the test scripts; it records every request."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[tuple[dict[str, str], Any]] = []
        app = web.Application()
        app.router.add_post("/rerank", self._handle)
        self.server = TestServer(app)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((dict(request.headers), await request.json()))
        return await self.handler(request)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/rerank"))


@pytest.fixture
async def serve() -> Any:
    started: list[Server] = []

    async def start(handler: Handler) -> Server:
        server = Server(handler)
        await server.server.start_server()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.server.close()


def cfg(url: str, backend: str = "cohere", **kw: Any) -> RerankConfig:
    return RerankConfig(model="acme/reranker", backend=backend, backend_url=url, warmup=False, **kw)


async def scores_of(rc: RerankConfig, query: str, passages: list[str]) -> list[float]:
    scorer = RemoteScorer(rc)
    try:
        return await scorer.score(query, passages)
    finally:
        await scorer.aclose()


def value(passage: str) -> float:
    """The score every test server gives a passage ``p<n>``: n / 10, so any mix-up shows."""
    number = passage.removeprefix("p")
    return float(number) / 10 if number.isdigit() else 0.0


async def cohere(request: web.Request) -> web.Response:
    """A Cohere-style answer, best first (not in the order sent), as servers answer."""
    docs = (await request.json())["documents"]
    results = [{"index": i, "relevance_score": value(d)} for i, d in enumerate(docs)]
    results.sort(key=lambda r: -r["relevance_score"])
    return web.json_response({"results": results, "model": "acme/reranker", "id": "x"})


async def tei(request: web.Request) -> web.Response:
    texts = (await request.json())["texts"]
    return web.json_response(sorted(({"index": i, "score": value(t)} for i, t in enumerate(texts)), key=str))


PASSAGES = ["p3", "p9", "p1", "p4"]


async def test_cohere_request_and_answer_mapped_back_by_index(serve: Any) -> None:
    server = await serve(cohere)
    got = await scores_of(cfg(server.url, backend_api_key=KEY), "what is p", PASSAGES)
    assert got == [0.3, 0.9, 0.1, 0.4]
    headers, body = server.requests[0]
    assert body == {
        "model": "acme/reranker",
        "query": "what is p",
        "documents": PASSAGES,
        "return_documents": False,
    }
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert headers["Content-Type"] == "application/json"


async def test_tei_request_and_answer_mapped_back_by_index(serve: Any) -> None:
    server = await serve(tei)
    assert await scores_of(cfg(server.url, backend="tei"), "what is p", PASSAGES) == [0.3, 0.9, 0.1, 0.4]
    headers, body = server.requests[0]
    assert body == {"query": "what is p", "texts": PASSAGES, "truncate": True, "raw_scores": True}
    assert "Authorization" not in headers  # no key configured, none sent


async def test_a_long_search_is_sent_in_chunks_at_once(serve: Any) -> None:
    arrived = asyncio.Event()
    sizes: list[int] = []

    async def all_at_once(request: web.Request) -> web.Response:
        sizes.append(len((await request.json())["documents"]))
        if len(sizes) == 3:
            arrived.set()
        await asyncio.wait_for(arrived.wait(), 10)  # only returns if the three calls overlap
        return await cohere(request)

    server = await serve(all_at_once)
    passages = [f"p{i}" for i in range(8)]
    got = await scores_of(cfg(server.url, backend_max_documents=3), "q", passages)
    assert got == [value(p) for p in passages]
    assert sorted(sizes) == [2, 3, 3]
    sent = [doc for _, body in server.requests for doc in body["documents"]]
    assert sorted(sent) == passages


def answering(status: int, body: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body, content_type="application/json")

    return handler


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (
            '{"results": [{"index": 0, "relevance_score": 1.0}, {"index": 1, "relevance_score": 0.5}]}',
            "got no score",
        ),
        (
            '{"results": [{"index": 0, "relevance_score": 1}, {"index": 0, "relevance_score": 1}, '
            '{"index": 1, "relevance_score": 1}]}',
            "answered twice",
        ),
        (
            '{"results": [{"index": 0, "relevance_score": 1}, {"index": 1, "relevance_score": 1}, '
            '{"index": 3, "relevance_score": 1}]}',
            "index 3 is not one of the 3",
        ),
        (
            '{"results": [{"index": 0, "relevance_score": NaN}, {"index": 1, "relevance_score": 1}, '
            '{"index": 2, "relevance_score": 1}]}',
            "not JSON",
        ),
        (
            '{"results": [{"index": 0, "relevance_score": 1e999}, {"index": 1, "relevance_score": 1}, '
            '{"index": 2, "relevance_score": 1}]}',
            "not JSON",
        ),
        (
            '{"results": [{"index": 0, "relevance_score": "0.9"}, {"index": 1, "relevance_score": 1}, '
            '{"index": 2, "relevance_score": 1}]}',
            "not a finite number",
        ),
        (
            '{"results": [{"index": true, "relevance_score": 1}, {"index": 1, "relevance_score": 1}, '
            '{"index": 2, "relevance_score": 1}]}',
            "True is not one of",
        ),
        ('{"data": []}', 'no "results" list'),
        ("[]", 'no "results" list'),
    ],
)
async def test_an_answer_that_is_not_one_finite_score_per_passage_is_an_error(
    serve: Any, body: str, why: str
) -> None:
    server = await serve(answering(200, body))
    with pytest.raises(RemoteError, match=why):
        await scores_of(cfg(server.url), "q", ["a", "b", "c"])
    assert len(server.requests) == 1


def test_non_finite_scores_are_refused_whatever_the_json_reader_lets_through() -> None:
    with pytest.raises(RemoteError, match="index 1 is not a finite number"):
        scores_by_index([(0, 1.0), (1, float("nan"))], 2)
    with pytest.raises(RemoteError, match="index 0 is not a finite number"):
        scores_by_index([(0, float("-inf"))], 1)
    assert scores_by_index([(1, 2), (0, -1.5)], 2) == [-1.5, 2.0]


async def test_a_tei_answer_missing_a_passage_is_an_error(serve: Any) -> None:
    server = await serve(answering(200, '[{"index": 1, "score": 0.5}]'))
    with pytest.raises(RemoteError, match="1 of the 2 passages sent got no score"):
        await scores_of(cfg(server.url, backend="tei"), "q", ["a", "b"])


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, RemoteError),
        (401, RemoteError),
        (404, RemoteError),
        (422, RemoteError),
        (500, RemoteError),
        (504, BackendUnavailable),
        (429, BackendOverloaded),
    ],
)
async def test_answers_that_a_retry_would_not_change_are_not_retried(
    serve: Any, status: int, error: type[Exception]
) -> None:
    server = await serve(answering(status, '{"detail": "no"}'))
    with pytest.raises(error) as caught:
        await scores_of(cfg(server.url), "q", ["a"])
    assert len(server.requests) == 1
    if status == 429:
        assert caught.value.reason == "overloaded"  # type: ignore[attr-defined]


@pytest.mark.parametrize("status", [502, 503])
async def test_a_gateway_error_is_retried_once(serve: Any, status: int) -> None:
    calls = 0

    async def flaky(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return await cohere(request) if calls == 2 else web.Response(status=status)

    server = await serve(flaky)
    assert await scores_of(cfg(server.url), "q", ["p5", "p2"]) == [0.5, 0.2]
    assert len(server.requests) == 2


async def test_a_second_gateway_error_makes_the_backend_unavailable(serve: Any) -> None:
    server = await serve(answering(503, "restarting"))
    with pytest.raises(BackendUnavailable, match="HTTP 503") as caught:
        await scores_of(cfg(server.url), "q", ["a"])
    assert caught.value.reason == "backend_unavailable"
    assert len(server.requests) == 2


async def test_a_dropped_connection_is_retried_once(serve: Any) -> None:
    calls = 0

    async def drops_first(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            assert request.transport is not None
            request.transport.close()  # the connection goes away without an answer
            await asyncio.sleep(0.1)
        return await cohere(request)

    server = await serve(drops_first)
    assert await scores_of(cfg(server.url), "q", ["p7"]) == [0.7]
    assert calls == 2


async def test_connection_refused_is_backend_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}/rerank"  # nothing listens there
    with pytest.raises(BackendUnavailable) as caught:
        await scores_of(cfg(url), "q", ["a"])
    assert caught.value.reason == "backend_unavailable"


async def test_a_slow_server_times_out_by_the_client_timeout_and_is_not_retried(serve: Any) -> None:
    release = asyncio.Event()

    async def stalls(request: web.Request) -> web.Response:
        await release.wait()
        return await cohere(request)

    server = await serve(stalls)
    try:
        # No asyncio.wait_for around it: the HTTP call's own timeout (rerank.timeout_ms) must end it.
        with pytest.raises(TimeoutError):
            await scores_of(cfg(server.url, timeout_ms=300), "q", ["p1"])
        assert len(server.requests) == 1
    finally:
        release.set()


async def test_passages_waiting_for_the_server_are_bounded_by_max_queued_pairs(serve: Any) -> None:
    release, arrived = asyncio.Event(), asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        if "p1" in (await request.json())["documents"]:  # the first search waits; the others do not
            arrived.set()
            await release.wait()
        return await cohere(request)

    server = await serve(held)
    scorer = RemoteScorer(cfg(server.url, max_queued_pairs=4))
    try:
        first = asyncio.ensure_future(scorer.score("q", ["p1", "p2", "p3"]))
        await asyncio.wait_for(arrived.wait(), 10)
        with pytest.raises(QueueFull) as caught:
            await scorer.score("q", ["p4", "p5"])
        assert caught.value.reason == "overloaded"
        assert await scorer.score("q", ["p6"]) == [0.6]  # room for one more
        release.set()
        assert await first == [0.1, 0.2, 0.3]
        assert scorer.pending == 0
        assert await scorer.score("q", ["p4", "p5"]) == [0.4, 0.5]
    finally:
        release.set()
        await scorer.aclose()


async def test_the_cache_spares_a_repeated_search_the_call(serve: Any) -> None:
    server = await serve(cohere)
    scorer = RemoteScorer(cfg(server.url, cache_entries=10))
    try:
        assert await scorer.score("q", ["p1", "p2"]) == [0.1, 0.2]
        assert await scorer.score("q", ["p2", "p3", "p1"]) == [0.2, 0.3, 0.1]
        assert [body["documents"] for _, body in server.requests] == [["p1", "p2"], ["p3"]]
    finally:
        await scorer.aclose()


async def test_one_pooled_session_made_on_first_use_and_closed(serve: Any) -> None:
    server = await serve(cohere)
    scorer = RemoteScorer(cfg(server.url))
    assert scorer._session is None  # made on the loop that uses it, not at construction
    await scorer.score("q", ["p1"])
    session = scorer._session
    await scorer.score("q", ["p2"])
    assert scorer._session is session and session is not None
    await scorer.aclose()
    assert session.closed


# Start-up: load_scorer picks the remote scorer, probes it, and fails in one line naming the option.


async def test_load_scorer_probes_the_server_and_loads_no_model(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = await serve(cohere)
    caplog.set_level(logging.DEBUG)
    scorer = await load_scorer(
        RerankConfig(model="p", backend="cohere", backend_url=server.url, backend_api_key=KEY)
    )
    try:
        assert isinstance(scorer, RemoteScorer)
        assert len(server.requests) == 1  # the start-up probe
        assert f"cohere rerank server at {server.url}" in caplog.text and "an API key" in caplog.text
        assert KEY not in caplog.text
    finally:
        await scorer.aclose()


async def test_a_server_down_at_start_stops_start_up_naming_backend_url() -> None:
    url = f"http://user:pw@127.0.0.1:{free_port()}/rerank?key=abc"
    with pytest.raises(ModelLoadError) as caught:
        await open_remote_scorer(RerankConfig(backend="tei", backend_url=url, backend_api_key=KEY))
    message = str(caught.value)
    assert message.startswith(
        "rerank.backend_url: a rerank call to the tei server at http://user:***@127.0.0.1:"
    )
    assert "\n" not in message and "pw" not in message and "abc" not in message and KEY not in message


async def test_a_refused_key_stops_start_up_naming_the_key_without_showing_it(serve: Any) -> None:
    async def echoes_the_key(request: web.Request) -> web.Response:
        return web.Response(status=401, text=f"bad token {request.headers['Authorization']}")

    server = await serve(echoes_the_key)
    with pytest.raises(
        ModelLoadError, match=r"^rerank\.backend_api_key: .*HTTP 401: bad token Bearer \*\*\*"
    ) as caught:
        await open_remote_scorer(RerankConfig(backend="cohere", backend_url=server.url, backend_api_key=KEY))
    assert KEY not in str(caught.value)


async def test_without_warmup_the_proxy_starts_while_the_server_is_down() -> None:
    url = f"http://127.0.0.1:{free_port()}/rerank"
    scorer = await load_scorer(RerankConfig(backend="cohere", backend_url=url, warmup=False))
    try:
        with pytest.raises(BackendUnavailable):
            await scorer.score("q", ["a"])
    finally:
        await scorer.aclose()


def test_the_offline_fallback_model_never_replaces_a_remote_servers_model() -> None:
    remote = Config(rerank=RerankConfig(backend="cohere", backend_url="http://infinity:7997/rerank"))
    assert offline_fallback(remote, frozenset(), {"HF_HUB_OFFLINE": "1"}) is None
    # The same default model with the local backend does fall back (the dev extra brings the package).
    assert offline_fallback(Config(), frozenset(), {"HF_HUB_OFFLINE": "1"}) is not None


def test_the_command_stops_in_one_line_when_the_remote_server_is_down() -> None:
    port = free_port()
    env = _env(
        RERANK_PROXY_RERANK_BACKEND="cohere",
        RERANK_PROXY_RERANK_BACKEND_URL=f"http://127.0.0.1:{port}/rerank",
        RERANK_PROXY_RERANK_BACKEND_API_KEY=KEY,
        RERANK_PROXY_SERVER_ADMIN_PORT="0",  # no admin listener: its fixed port may be taken here
    )
    line = start_up_error([], 1, "rerank.backend_url", f"127.0.0.1:{port}/rerank", env=env)
    assert KEY not in line, line
