"""Shared fixtures: a real Elasticsearch, a tiny local model, and the proxy running on a real port.

Elasticsearch comes from ``scripts/elasticsearch.sh`` (the official integ-test zip from Maven
Central) unless ``ELASTICSEARCH_URL`` names one already running. The proxy runs on its own thread
and event loop, exactly as in production, so the official *sync* client can talk to it too. That loop
runs in asyncio debug mode and a test fails if anything blocks it for longer than
``BLOCKED_LOOP_S`` (a model call on the loop thread would).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.config import Config, RerankConfig, UpstreamConfig
from proxy.scorer import Scorer

from .corpus import DOCS
from .tiny_model import build_tiny_cross_encoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
ES_SCRIPT = ROOT / "scripts" / "elasticsearch.sh"
BLOCKED_LOOP_S = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def es_url() -> Iterator[str]:
    """A real Elasticsearch: ELASTICSEARCH_URL, or one started by the project's script."""
    if os.environ.get("ELASTICSEARCH_URL"):
        yield os.environ["ELASTICSEARCH_URL"].rstrip("/")
        return
    env = {**os.environ, "ES_PORT": os.environ.get("ES_TEST_PORT", "9250")}
    status = subprocess.run(["bash", str(ES_SCRIPT), "status"], env=env, capture_output=True)
    started = status.returncode != 0
    if started:
        subprocess.run(["bash", str(ES_SCRIPT), "start"], env=env, check=True, timeout=600)
    url = subprocess.run(
        ["bash", str(ES_SCRIPT), "url"], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    yield url
    if started:
        subprocess.run(["bash", str(ES_SCRIPT), "stop"], env=env, timeout=120)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [d["text"] for d in DOCS] + [d["title"] for d in DOCS]
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce"), texts)


class _BlockedLoop(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "Executing" in record.getMessage() and "took" in record.getMessage():
            self.messages.append(record.getMessage())


class ProxyThread:
    """The proxy app served on 127.0.0.1:<port> from a thread with its own event loop."""

    def __init__(self, cfg: Config, scorer: Scorer | None = None) -> None:
        self.port = free_port()
        self.cfg = replace(cfg, server=replace(cfg.server, port=self.port))
        self.scorer = scorer
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.blocked = _BlockedLoop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="proxy-under-test", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.set_debug(True)
        self.loop.slow_callback_duration = BLOCKED_LOOP_S
        try:
            self.runner = web.AppRunner(
                create_app(self.cfg, scorer=self.scorer), access_log=None, handler_cancellation=True
            )
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", self.port)
            self.loop.run_until_complete(site.start())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
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
        rerank=RerankConfig(model=str(model), device="cpu", **rerank),  # type: ignore[arg-type]
    )


@pytest.fixture(scope="session")
def proxy(es_url: str, tiny_model: Path) -> Iterator[ProxyThread]:
    """The proxy with the tiny real model, top_k 20, in front of the test Elasticsearch."""
    server = ProxyThread(make_config(es_url, tiny_model, top_k=20, field=("text",))).start()
    yield server
    server.stop()
