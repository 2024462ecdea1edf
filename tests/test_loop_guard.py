"""The tests' guard against blocking the proxy's event loop catches a block, and only its own proxy's.

Every ``ProxyThread`` fails its test at ``stop()`` when a step of its loop took longer than
``BLOCKED_LOOP_S``; this checks the guard itself, with a scorer that blocks the loop on purpose.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from elasticsearch import Elasticsearch

from .conftest import BLOCKED_LOOP_S, ProxyThread, make_config
from .corpus import DOCS, index_fixture
from .servers import http

pytestmark = pytest.mark.integration

INDEX = "loop-guard"
BODY = json.dumps({"query": {"match": {"text": "coffee brewed with water"}}, "size": 3}).encode()


class BlockingScorer:
    """Scores with the event loop's own thread asleep: what a model call on the loop would do."""

    name = "blocking"

    async def score(self, query: str, passages: Sequence[str]) -> list[float]:
        time.sleep(BLOCKED_LOOP_S + 0.3)  # noqa: ASYNC251 - blocking the loop is the point
        return [0.0] * len(passages)

    async def aclose(self) -> None:
        pass


es = index_fixture((INDEX, DOCS))


def search(server: ProxyThread) -> int:
    status, _, _ = http(f"{server.url}/{INDEX}/_search", "POST", BODY, {"Content-Type": "application/json"})
    return status


def test_a_blocked_loop_fails_its_own_proxy_only(es_url: str, es: Elasticsearch, tiny_model: Path) -> None:
    cfg = make_config(es_url, tiny_model, top_k=5)
    blocked = ProxyThread(cfg, scorer=BlockingScorer()).start()
    bystander = ProxyThread(cfg, scorer=BlockingScorer()).start()
    try:
        assert search(blocked) == 200
    finally:
        bystander.stop()  # its loop never blocked: another proxy's warning is not its own
        with pytest.raises(AssertionError, match="event loop was blocked"):
            blocked.stop()
