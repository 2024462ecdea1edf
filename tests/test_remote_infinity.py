"""End to end with a real rerank server: the proxy, configured with ``rerank.backend: cohere``, in front
of the real Elasticsearch, scoring on infinity-emb.

infinity-emb runs from its own virtual environment (``scripts/infinity.sh`` makes it once per clone,
sharing .venv's torch: it pins transformers 4, the proxy runs 5), offline, on loopback, serving a
tiny cross-encoder folder built here. Its own answers for the same passages are the expected order,
so the test checks the proxy against the server, not against itself. When the environment cannot be
made the tests fail with the script's reason: a suite that silently skipped them would claim a
remote backend it never ran.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import orjson
import pytest
import urllib3
from elasticsearch import Elasticsearch

from benchmarks.peers import infinity_command, infinity_server

from .conftest import ProxyThread, make_config
from .corpus import DOCS, create_index
from .tiny_model import build_tiny_cross_encoder

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INDEX = "rerank-remote-docs"
QUERY = "coffee brewed with water"
TOP_K = 20


@pytest.fixture(scope="module")
def infinity_emb() -> str:
    """The ``infinity_emb`` command; made by scripts/infinity.sh when this clone has none yet."""
    command, why = infinity_command()
    if command is None:
        pytest.fail(f"no infinity-emb server to test the remote backend with: {why}", pytrace=False)
    return command


@pytest.fixture(scope="module")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-logit BERT sequence-classification folder, which infinity-emb serves as a reranker. Its
    small head keeps logits near 0, where infinity's sigmoid still tells passages apart."""
    texts = [d["text"] for d in DOCS] + [d["title"] for d in DOCS]
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("infinity-model"), texts, head_std=0.2)


class Infinity:
    def __init__(self, command: str, model: Path, log: Path) -> None:
        self._stack = ExitStack()
        self.url, _ = self._stack.enter_context(infinity_server(command, str(model), log))

    def scores(self, query: str, passages: list[str]) -> list[float]:
        """infinity's own scores, one call with every passage, in the order given."""
        body = {"query": query, "documents": passages, "return_documents": False}
        headers = {"Content-Type": "application/json"}
        resp = urllib3.request(
            "POST", f"{self.url}/rerank", body=orjson.dumps(body), headers=headers, timeout=60
        )
        assert resp.status == 200, resp.data
        out = [0.0] * len(passages)
        for result in orjson.loads(resp.data)["results"]:
            out[result["index"]] = result["relevance_score"]
        return out

    def stop(self) -> None:
        self._stack.close()


@pytest.fixture
def infinity(infinity_emb: str, served_model: Path, tmp_path: Path) -> Iterator[Infinity]:
    server = Infinity(infinity_emb, served_model, tmp_path / "infinity.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def es(es_url: str) -> Iterator[Elasticsearch]:
    client = Elasticsearch(es_url)
    create_index(client, INDEX, DOCS)
    yield client
    client.options(ignore_status=404).indices.delete(index=INDEX)
    client.close()


@pytest.fixture
def proxy(es: Elasticsearch, es_url: str, infinity: Infinity, served_model: Path) -> Iterator[ProxyThread]:
    """The proxy scoring on infinity, searches sent in chunks of 8 passages (three calls for a top 20)."""
    cfg = make_config(
        es_url,
        served_model,  # with one model loaded, infinity answers whatever name is asked for
        top_k=TOP_K,
        field=("text",),
        backend="cohere",
        backend_url=f"{infinity.url}/rerank",
        backend_max_documents=8,
        timeout_ms=20000,  # two busy cores shared with the test's Elasticsearch
    )
    server = ProxyThread(cfg).start()  # start-up probes infinity: it must answer
    yield server
    server.stop()


def ids(resp: Any) -> list[str]:
    return [h["_id"] for h in resp["hits"]["hits"]]


def test_a_search_is_reranked_in_the_order_of_infinitys_own_scores(
    es: Elasticsearch, proxy: ProxyThread, infinity: Infinity
) -> None:
    query = {"match": {"text": QUERY}}
    with Elasticsearch(proxy.url) as client:
        resp = client.search(index=INDEX, query=query, size=10)
    assert resp.meta.headers["X-Rerank-Status"] == "reranked"

    head = es.search(index=INDEX, query=query, size=TOP_K)["hits"]["hits"]
    assert len(head) > 10  # more candidates than the page: the order decides which are shown
    scores = infinity.scores(QUERY, [h["_source"]["text"] for h in head])
    order = sorted(range(len(head)), key=lambda i: -scores[i])
    assert ids(resp) == [head[i]["_id"] for i in order][:10]
    assert ids(resp) != [h["_id"] for h in head[:10]]  # infinity does disagree with BM25 here
    served = {h["_id"]: h["_score"] for h in resp["hits"]["hits"]}
    for i in order[:10]:
        assert served[head[i]["_id"]] == pytest.approx(scores[i], abs=1e-5)


def test_once_infinity_is_gone_searches_are_answered_in_elasticsearchs_order(
    es: Elasticsearch, proxy: ProxyThread, infinity: Infinity
) -> None:
    query = {"match": {"text": QUERY}}
    with Elasticsearch(proxy.url) as client:
        assert client.search(index=INDEX, query=query, size=10).meta.headers["X-Rerank-Status"] == "reranked"
        infinity.stop()
        resp = client.search(index=INDEX, query=query, size=10)
    assert resp.meta.headers["X-Rerank-Status"] == "skipped"
    assert resp.meta.headers["X-Rerank-Reason"] == "backend_unavailable"
    direct = es.search(index=INDEX, query=query, size=10)
    assert ids(resp) == ids(direct)
    assert [h["_score"] for h in resp["hits"]["hits"]] == [h["_score"] for h in direct["hits"]["hits"]]
