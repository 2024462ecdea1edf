"""The proxy's core contract against every server of the matrix: Elasticsearch 8.19 and 9.5, OpenSearch
3.8 and 2.19 (tests/servers.py).

Each test runs once per server (``-m es9`` picks one), with the server's own official client
(tests/server_clients.py) talking to the proxy and, for the expected answer, to the server directly:
pass-through answers are byte for byte the server's, a search is reranked exactly as the model scores
the server's own top hits (computed here with plain transformers, tests/tiny_model.py), ``_source``
filters give what the server would, pages partition the reranked list, and the server's errors reach
the client verbatim. Anything a server does differently from Elasticsearch 8 shows up here first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import ProxyThread, make_config
from .corpus import DOCS, MAPPINGS
from .server_clients import Answer, SearchClient, official_client
from .servers import SERVERS, ServerPool, ServerSpec, http
from .tiny_model import reference_scores

pytestmark = pytest.mark.integration

INDEX = f"rerank-matrix-{os.getpid()}"  # its own per session: developers share the default server
QUERY = "coffee brewed with water"
MATCH = {"match": {"text": QUERY}}
TOP_K = 20  # the proxy's top_k here
JSON = {"Content-Type": "application/json"}


def index_corpus(url: str) -> None:
    """The test corpus in this session's index, through the REST API every server of the matrix shares."""
    http(f"{url}/{INDEX}", "DELETE")
    create = {"mappings": MAPPINGS, "settings": {"number_of_shards": 1, "number_of_replicas": 0}}
    status, _, body = http(f"{url}/{INDEX}", "PUT", json.dumps(create).encode(), JSON)
    assert status == 200, body
    actions: list[dict[str, Any]] = []
    for doc in DOCS:
        actions += [{"index": {"_id": doc["id"]}}, {k: v for k, v in doc.items() if k != "id"}]
    ndjson = "".join(json.dumps(action) + "\n" for action in actions).encode()
    status, _, body = http(
        f"{url}/{INDEX}/_bulk?refresh=true", "POST", ndjson, {"Content-Type": "application/x-ndjson"}
    )
    assert status == 200 and not json.loads(body)["errors"], body[:500]


@dataclass
class Server:
    spec: ServerSpec
    url: str
    proxy: ProxyThread
    direct: SearchClient  # the server's official client, straight to the server
    via_proxy: SearchClient  # the same client, through the proxy


@pytest.fixture(
    scope="module",
    params=[pytest.param(s, marks=getattr(pytest.mark, s.marker), id=s.marker) for s in SERVERS],
)
def server(request: pytest.FixtureRequest, server_pool: ServerPool, tiny_model: Path) -> Iterator[Server]:
    """One server of the matrix with the test corpus indexed, a proxy (tiny model, top_k 20) in front
    of it, and its official client both ways."""
    spec: ServerSpec = request.param
    url = server_pool.url(spec.marker)
    index_corpus(url)
    proxy = ProxyThread(make_config(url, tiny_model, top_k=TOP_K, field=("text",))).start()
    direct = official_client(spec.distribution, spec.major, url)
    via_proxy = official_client(spec.distribution, spec.major, proxy.url)
    yield Server(spec, url, proxy, direct, via_proxy)
    direct.close()
    via_proxy.close()
    proxy.stop()
    http(f"{url}/{INDEX}", "DELETE")


def ids(answer: Answer) -> list[str]:
    return [h["_id"] for h in answer.body["hits"]["hits"]]


def reranked_ids(model: Path, text: str, server_answer: Answer) -> list[str]:
    """The server's own top_k hits sorted by the model's score (ties keep the server's order)."""
    hits = server_answer.body["hits"]["hits"][:TOP_K]
    scores = reference_scores(model, text, [h["_source"]["text"] for h in hits])
    return [hits[i]["_id"] for i in sorted(range(len(hits)), key=lambda i: -scores[i])]


def test_official_client_gets_the_reranked_search(server: Server, tiny_model: Path) -> None:
    """The acceptance criterion: the top 10 are the server's top_k in the model's order, and the rest
    of the answer is the server's own."""
    top_k = server.direct.search(INDEX, query=MATCH, size=TOP_K)
    resp = server.via_proxy.search(INDEX, query=MATCH, size=10)

    assert resp.status == 200, resp.body
    assert resp.headers["x-rerank-status"] == "reranked"
    assert ids(resp) == reranked_ids(tiny_model, QUERY, top_k)[:10]
    assert ids(resp) != ids(top_k)[:10]  # the tiny model does disagree with BM25 here
    scores = [h["_score"] for h in resp.body["hits"]["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert resp.body["hits"]["max_score"] == scores[0]
    assert set(resp.body) == set(top_k.body)
    for key in ("_shards", "timed_out"):
        assert resp.body[key] == top_k.body[key]
    assert resp.body["hits"]["total"] == top_k.body["hits"]["total"]
    by_id = {h["_id"]: h for h in top_k.body["hits"]["hits"]}
    for hit in resp.body["hits"]["hits"]:
        assert {k: v for k, v in hit.items() if k != "_score"} == {
            k: v for k, v in by_id[hit["_id"]].items() if k != "_score"
        }


# A proxy defect (proxy/source_filter.py, source_semantics.py), strict xfails so each case fails once
# it is fixed: when the client's excludes hide only the passage, the proxy sends none upstream and cuts
# the passage out itself, keeping the document's key order. The server filters such a request the
# "map" way (OpenSearch always, Elasticsearch when an exclude has a *), which rebuilds _source as a Java
# HashMap: e.g. {"year", "meta": {"lang", "summary"}, "tag", "title"} instead of the stored
# {"title", "tag", "year", "meta"}. Same keys and values, another order, visible to every client.
KEY_ORDER_DEFECT = "proxy keeps the document's key order where the server's map filtering reorders _source"
ALL = frozenset(s.marker for s in SERVERS)
OPENSEARCH = frozenset(s.marker for s in SERVERS if s.distribution == "opensearch")


@pytest.mark.parametrize(
    ("search", "text", "key_order_defect_on"),
    [
        (
            {"q": "text:(coffee OR tea) AND water", "source_excludes": ["text"]},
            "coffee tea water",
            OPENSEARCH,
        ),
        ({"query": MATCH, "source_excludes": ["te*"]}, QUERY, ALL),
        ({"query": MATCH, "source_includes": ["title", "meta.lang"]}, QUERY, frozenset()),
        ({"query": MATCH, "source": {"excludes": ["text", "meta"]}}, QUERY, frozenset()),
        ({"query": MATCH, "source": False}, QUERY, frozenset()),
    ],
    ids=["q-excludes-passage", "wildcard-excludes-passage", "includes", "body-excludes", "no-source"],
)
def test_source_filter_gives_what_the_server_gives(
    server: Server,
    tiny_model: Path,
    request: pytest.FixtureRequest,
    search: dict[str, Any],
    text: str,
    key_order_defect_on: frozenset[str],
) -> None:
    """The proxy needs the passage to score and the client's filter may hide it: the reranked hits must
    still carry exactly the ``_source`` the server gives for that filter, key order included."""
    if server.spec.marker in key_order_defect_on:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KEY_ORDER_DEFECT))
    unfiltered = {k: v for k, v in search.items() if k in ("q", "query")}
    expected = reranked_ids(tiny_model, text, server.direct.search(INDEX, size=TOP_K, **unfiltered))
    filtered = {h["_id"]: h for h in server.direct.search(INDEX, size=TOP_K, **search).body["hits"]["hits"]}
    resp = server.via_proxy.search(INDEX, size=5, **search)

    assert resp.headers["x-rerank-status"] == "reranked"
    assert ids(resp) == expected[:5]
    for hit in resp.body["hits"]["hits"]:
        assert ("_source" in hit) == ("_source" in filtered[hit["_id"]])
        # Key order too: clients keep it (Python dicts, JavaScript objects).
        assert json.dumps(hit.get("_source")) == json.dumps(filtered[hit["_id"]].get("_source"))


@pytest.mark.parametrize(("from_", "size"), [(0, 4), (4, 4), (8, 4), (TOP_K - 2, 4), (TOP_K, 5)])
def test_pages_follow_the_ordering_contract(server: Server, tiny_model: Path, from_: int, size: int) -> None:
    """A page is a window of one list: the server's top_k in the model's order, then the server's
    hits past top_k in its own order. A page starting at or past top_k is the server's answer."""
    server_order = server.direct.search(INDEX, query=MATCH, size=max(TOP_K, from_ + size))
    contract = reranked_ids(tiny_model, QUERY, server_order) + ids(server_order)[TOP_K:]
    resp = server.via_proxy.search(INDEX, query=MATCH, from_=from_, size=size)

    assert resp.status == 200, resp.body
    assert ids(resp) == contract[from_ : from_ + size]
    if from_ >= TOP_K:
        assert resp.headers["x-rerank-status"] == "skipped"
        assert resp.headers["x-rerank-reason"] == "window_beyond_top_k"
    else:
        assert resp.headers["x-rerank-status"] == "reranked"


@pytest.mark.parametrize(
    ("index", "search"),
    [
        ("no-such-index", {"query": MATCH}),
        (INDEX, {"query": {"match": {"text": {"query": QUERY, "no_such_option": 1}}}}),
        (INDEX, {"query": MATCH, "from_": -1}),
    ],
    ids=["missing-index", "bad-query", "bad-from"],
)
def test_server_errors_reach_the_client_verbatim(server: Server, index: str, search: dict[str, Any]) -> None:
    """A search the proxy would rerank but the server refuses: the client sees the server's error."""
    direct = server.direct.search(index, **search)
    resp = server.via_proxy.search(index, **search)
    assert direct.status >= 400  # the case really is an error on this server
    assert (resp.status, resp.body) == (direct.status, direct.body)
    assert resp.headers["x-rerank-status"] == "skipped"
    assert resp.headers.get("content-type") == direct.headers.get("content-type")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/{index}/_doc/3", None),
        ("GET", "/{index}/_doc/3?_source_includes=title&pretty", None),
        ("HEAD", "/{index}", None),
        ("HEAD", "/{index}/_doc/nope", None),
        ("GET", "/{index}/_count?q=coffee", None),
        ("POST", "/{index}/_count", b'{"query": {"match": {"text": "tea"}}}'),
        ("GET", "/{index}/_mapping", None),
        ("GET", "/_cat/indices/{index}?h=index,docs.count&format=json", None),
        ("GET", "/", None),
        ("POST", "/{index}/_search", b'{"query": {"match": '),  # invalid JSON: the server's own error
        ("GET", "/no-such-index/_search?q=coffee", None),  # the server's own 404
        ("POST", "/{index}/_search", b'{"query": {"match": {"text": "tea"}}, "size": "many"}'),
    ],
    ids=[
        "doc",
        "doc-filtered-pretty",
        "head-index",
        "head-missing-doc",
        "count-q",
        "count-body",
        "mapping",
        "cat-indices",
        "root",
        "search-invalid-json",
        "search-missing-index",
        "search-bad-size",
    ],
)
def test_passthrough_is_byte_equal(server: Server, method: str, path: str, body: bytes | None) -> None:
    """What the proxy relays, and the errors it passes on, are the server's exact bytes."""
    path = path.format(index=INDEX)
    d_status, d_headers, d_body = http(server.url + path, method, body, JSON)
    p_status, p_headers, p_body = http(server.proxy.url + path, method, body, JSON)
    assert (p_status, p_body) == (d_status, d_body)
    for name in ("content-type", "x-elastic-product", "content-length"):
        assert p_headers.get(name) == d_headers.get(name)
