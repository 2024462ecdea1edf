"""Shared fixtures: a real Elasticsearch, a tiny local model, and the proxy running on a real port.

Elasticsearch comes from ``scripts/elasticsearch.sh`` (the official integ-test zip from Maven
Central) unless ``ELASTICSEARCH_URL`` names one already running; so do the other servers of the test
matrix (Elasticsearch 9, OpenSearch 3 and 2: ``tests/servers.py``). The proxy runs on its own thread
and event loop, exactly as in production, so the official *sync* client can talk to it too. That loop
runs in asyncio debug mode and a test fails if anything blocks it for longer than
``BLOCKED_LOOP_S`` (a model call on the loop thread would).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import settings

from proxy.app import create_app
from proxy.config import Config, RerankConfig, UpstreamConfig
from proxy.scorer import Scorer
from proxy.server import start as serve

from . import servers
from .corpus import DOCS
from .servers import ServerPool
from .tiny_model import build_tiny_cross_encoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Property tests: the same 150 examples per test on every run (derandomize), so CI is reproducible and
# fast; HYPOTHESIS_PROFILE=explore draws 2000 fresh random ones. A failure prints the blob that
# replays it (@reproduce_failure); no example database is written into the checkout.
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True, max_examples=150
)
settings.register_profile("explore", database=None, deadline=None, print_blob=True, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = Path(__file__).resolve().parent.parent
# A step of the proxy's event loop longer than this fails the test: a model call or a model load on
# the loop takes seconds. asyncio measures wall time, so a loop thread merely descheduled on a busy
# 2-core machine (real servers, model threads) can take half a second; one second leaves room for it.
BLOCKED_LOOP_S = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NEEDED_SERVERS = pytest.StashKey[set[str]]()


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the markers it adds
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    servers.mark_items(items)


def pytest_collection_finish(session: pytest.Session) -> None:
    session.config.stash[NEEDED_SERVERS] = servers.needed_by(session.items)


@pytest.fixture(scope="session")
def server_pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerPool]:
    """The real servers the selected tests need, started together on first use (tests/servers.py)."""
    needed: set[str] = request.config.stash.get(NEEDED_SERVERS, set())
    pool = ServerPool(needed, tmp_path_factory.mktemp("servers"))
    yield pool
    pool.stop()


@pytest.fixture(scope="session")
def es_url(server_pool: ServerPool) -> str:
    """A real Elasticsearch 8: ELASTICSEARCH_URL, or one started by the project's script on port 9250
    (ES_TEST_PORT)."""
    return server_pool.url("es8")


@pytest.fixture(scope="session")
def es9_url(server_pool: ServerPool) -> str:
    """A real Elasticsearch 9: ES9_URL, or one started by the project's script on port 9251."""
    return server_pool.url("es9")


@pytest.fixture(scope="session")
def opensearch3_url(server_pool: ServerPool) -> str:
    """A real OpenSearch 3: OPENSEARCH3_URL, or one started by the project's script on port 9252. Its zip
    has lang-mustache, so search templates really render there."""
    return server_pool.url("os3")


@pytest.fixture(scope="session")
def opensearch2_url(server_pool: ServerPool) -> str:
    """A real OpenSearch 2: OPENSEARCH2_URL, or one started by the project's script on port 9253."""
    return server_pool.url("os2")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [d["text"] for d in DOCS] + [d["title"] for d in DOCS]
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce"), texts)


class _BlockedLoop(logging.Handler):
    """asyncio's slow-callback warnings from one proxy's loop thread. The handler sits on the shared
    ``asyncio`` logger, so a warning from another proxy's loop (several run at once) is not this one's."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.thread: int | None = None  # the loop thread's ident, set when it starts

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return
        if "Executing" in record.getMessage() and "took" in record.getMessage():
            self.messages.append(record.getMessage())


class ProxyThread:
    """The proxy app served on 127.0.0.1:<port> from a thread with its own event loop, its admin
    listener on 127.0.0.1:<another free port> (``admin_url``). https when the configuration names a
    certificate (``url`` says which)."""

    def __init__(self, cfg: Config, scorer: Scorer | None = None) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        server = replace(cfg.server, port=self.port, admin_host="127.0.0.1", admin_port=self.admin_port)
        self.cfg = replace(cfg, server=server)
        self.scorer = scorer
        scheme = "https" if server.tls_cert_file else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.loop = asyncio.new_event_loop()
        self.blocked = _BlockedLoop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="proxy-under-test", daemon=True)

    def _run(self) -> None:
        self.blocked.thread = threading.get_ident()
        asyncio.set_event_loop(self.loop)
        self.loop.set_debug(True)
        self.loop.slow_callback_duration = BLOCKED_LOOP_S
        try:
            # Served exactly as the command serves it (proxy/server.py).
            app = create_app(self.cfg, scorer=self.scorer)
            self.serving = self.loop.run_until_complete(serve(app, "127.0.0.1", self.port, self.cfg.server))
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.serving.cleanup())
        self.loop.close()

    def start(self) -> ProxyThread:
        logging.getLogger("asyncio").addHandler(self.blocked)
        self._thread.start()
        self._ready.wait(120)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        logging.getLogger("asyncio").removeHandler(self.blocked)
        assert not self.blocked.messages, f"the proxy's event loop was blocked: {self.blocked.messages}"


def make_config(es_url: str, model: Path | str, **rerank: object) -> Config:
    return Config(
        upstream=UpstreamConfig(url=es_url, timeout_s=30),
        # float32: the expected orders are computed with plain float32 transformers
        rerank=RerankConfig(model=str(model), device="cpu", **{"dtype": "float32", **rerank}),  # type: ignore[arg-type]
    )


@pytest.fixture(scope="session")
def proxy(es_url: str, tiny_model: Path) -> Iterator[ProxyThread]:
    """The proxy with the tiny real model, top_k 20, in front of the test Elasticsearch."""
    server = ProxyThread(make_config(es_url, tiny_model, top_k=20, field=("text",))).start()
    yield server
    server.stop()
