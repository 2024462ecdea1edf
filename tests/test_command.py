"""The ``rerank-proxy`` command as a user runs it: a real process, a real port, a real Elasticsearch."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from elasticsearch import Elasticsearch

from .conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy.cli", *args]


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without RERANK_PROXY_ settings, offline, the admin listener on a free
    port (the default one may be taken by another proxy on the machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_PROXY_")}
    return {**env, "HF_HUB_OFFLINE": "1", "RERANK_PROXY_SERVER_ADMIN_PORT": str(free_port()), **extra}


@pytest.fixture
def running(es_url: str, tiny_model: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        _cmd(
            "--upstream",
            es_url,
            "--rerank-top-k",
            "10",
            "--rerank-device",
            "cpu",
            "--rerank-dtype",
            "float32",
        ),
        env=_env(RERANK_PROXY_SERVER_PORT=str(port), RERANK_PROXY_RERANK_MODEL=str(tiny_model)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            Elasticsearch(url).cluster.health()
            break
        except Exception:
            time.sleep(0.3)
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    yield url
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_command_serves_reranked_search(running: str, es_url: str) -> None:
    es = Elasticsearch(es_url)
    es.index(index="rerank-cmd", id="1", document={"text": "espresso coffee"}, refresh=True)
    es.index(index="rerank-cmd", id="2", document={"text": "coffee and tea"}, refresh=True)
    try:
        resp = Elasticsearch(running).search(index="rerank-cmd", query={"match": {"text": "coffee"}})
        assert resp.meta.headers["X-Rerank-Status"] == "reranked"
        assert sorted(h["_id"] for h in resp["hits"]["hits"]) == ["1", "2"]
    finally:
        es.indices.delete(index="rerank-cmd")


# Start-up failures (bad options, models, devices, ports): tests/test_startup_errors.py.
