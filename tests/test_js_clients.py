"""Real JavaScript clients through the proxy, run by node: the official Elasticsearch client (8.x
against Elasticsearch 8, 9.x against Elasticsearch 9: ``search``, ``msearch`` and the
``helpers.msearch`` batcher) and Searchkit's API (``@searchkit/api``), which turns InstantSearch
queries into one ``_msearch``.

tests/js holds the clients (package.json and package-lock.json, exact versions) and one script per
client that takes the URL on argv and a JSON spec on stdin and prints JSON. The ``node`` fixture runs
``npm ci`` into tests/js/node_modules when it is missing or was installed from another lock file.
Expected orders are the model's order of the server's own top hits, computed here with plain
transformers (tests/tiny_model.py), never taken from the proxy; each reranked page is also checked
to differ from the server's own page, so an answer passed through unreranked fails.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import ProxyThread, make_config
from .corpus import DOCS, MAPPINGS
from .tiny_model import reference_scores

pytestmark = pytest.mark.integration

JS = Path(__file__).resolve().parent / "js"
INDEX = f"rerank-js-{os.getpid()}"  # its own per session: developers share the default server
TOP_K = 20  # the proxies' top_k
QUERY = "coffee brewed with water"
MATCH = {"match": {"text": QUERY}}
BREAD = "sourdough bread starter"
TEA = "green tea brewed below boiling"
TAGS = {"tags": {"terms": {"field": "tag"}}}
TITLES = {d["id"]: d["title"] for d in DOCS}


# -- node, npm and HTTP -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def node() -> str:
    """node, with tests/js/node_modules installed by ``npm ci`` from the committed lock file (once:
    a stamp in node_modules names the lock file it came from; a lock on the lock file keeps two
    sessions from installing at once). npm's cache (~/.npm) makes a repeat install take seconds."""
    exe, npm = shutil.which("node"), shutil.which("npm")
    if exe is None or npm is None:
        pytest.skip("node and npm are needed for the JavaScript client tests (tests/js)")
    lock = JS / "package-lock.json"
    digest = hashlib.sha256(lock.read_bytes() + (JS / "package.json").read_bytes()).hexdigest()
    stamp = JS / "node_modules" / ".rerank-proxy-lock.sha256"
    with open(lock, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if not stamp.is_file() or stamp.read_text() != digest:
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"],
                cwd=JS,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if done.returncode != 0:
                pytest.fail(f"npm ci in {JS} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            stamp.write_text(digest)
    return exe


def run_js(node: str, script: str, *args: str, spec: Any) -> Any:
    """Run tests/js/<script> with ``args`` and the JSON ``spec`` on stdin; its JSON output."""
    done = subprocess.run(
        [node, str(JS / script), *args],
        input=json.dumps(spec),
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{script} {args} failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout)


def http(
    url: str, method: str = "GET", body: bytes | None = None, ctype: str = "application/json"
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def create_index(url: str) -> None:
    http(f"{url}/{INDEX}", "DELETE")
    index = {"mappings": MAPPINGS, "settings": {"number_of_shards": 1, "number_of_replicas": 0}}
    status, raw = http(f"{url}/{INDEX}", "PUT", json.dumps(index).encode())
    assert status == 200, raw
    pairs = (({"index": {"_id": d["id"]}}, {k: v for k, v in d.items() if k != "id"}) for d in DOCS)
    lines = "".join(json.dumps(line) + "\n" for pair in pairs for line in pair)
    status, raw = http(f"{url}/{INDEX}/_bulk?refresh=true", "POST", lines.encode(), "application/x-ndjson")
    assert status == 200 and not json.loads(raw)["errors"], raw[:2000]


def ids(body: dict[str, Any]) -> list[str]:
    return [h["_id"] for h in body["hits"]["hits"]]


def server_top_k(url: str, body: dict[str, Any], index: str = INDEX) -> list[dict[str, Any]]:
    """The server's own top_k hits for a search body, passages included."""
    widened = {**body, "from": 0, "size": TOP_K, "_source": True}
    status, raw = http(f"{url}/{index}/_search", "POST", json.dumps(widened).encode())
    assert status == 200, raw
    hits: list[dict[str, Any]] = json.loads(raw)["hits"]["hits"]
    return hits


def model_order(model: Path, text: str, hits: list[dict[str, Any]]) -> list[str]:
    """The hits' ids sorted by the model's score (ties keep the server's order)."""
    scores = reference_scores(model, text, [h["_source"]["text"] for h in hits])
    return [hits[i]["_id"] for i in sorted(range(len(hits)), key=lambda i: -scores[i])]


def expected(
    url: str, model: Path, text: str, body: dict[str, Any] | None = None
) -> tuple[list[str], list[str]]:
    """(the model's order of the server's top_k, the server's own order) for a search. Tests check a
    page against the first and that it differs from the second, so a pass-through fails."""
    hits = server_top_k(url, body if body is not None else {"query": {"match": {"text": text}}})
    return model_order(model, text, hits), [h["_id"] for h in hits]


# -- the servers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def es8_index(es_url: str) -> Iterator[str]:
    create_index(es_url)
    yield es_url
    http(f"{es_url}/{INDEX}", "DELETE")


@dataclass(frozen=True)
class Cluster:
    major: str  # the JavaScript client's major version, as es_client.mjs takes it
    url: str  # the server
    proxy_url: str  # the proxy in front of it (tiny model, top_k 20, passage field text)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("8", marks=pytest.mark.es8, id="es8"),
        pytest.param("9", marks=pytest.mark.es9, id="es9"),
    ],
)
def cluster(request: pytest.FixtureRequest, node: str, tiny_model: Path) -> Iterator[Cluster]:
    """Elasticsearch 8 with the session's proxy (for the 8.x client), or Elasticsearch 9 with a
    proxy of its own (for the 9.x client), the corpus indexed."""
    if request.param == "8":
        url = request.getfixturevalue("es8_index")
        yield Cluster("8", url, request.getfixturevalue("proxy").url)
        return
    url = request.getfixturevalue("es9_url")
    create_index(url)
    server = ProxyThread(make_config(url, tiny_model, top_k=TOP_K, field=("text",))).start()
    try:
        yield Cluster("9", url, server.url)
    finally:
        server.stop()
        http(f"{url}/{INDEX}", "DELETE")


def es_client(node: str, url: str, major: str, spec: dict[str, Any]) -> Any:
    out = run_js(node, "es_client.mjs", url, major, spec=spec)
    assert out["client_version"].split(".")[0] == major  # the client asked for, not the other one
    return out


# -- the official client -------------------------------------------------------------------------------


def test_search(cluster: Cluster, node: str, tiny_model: Path) -> None:
    """``client.search``: the model's order of the server's top_k, cut to the page, ``_source`` as
    filtered, totals and aggregations the server's own."""
    params = {"index": INDEX, "query": MATCH, "size": 5, "_source": ["title"], "aggs": TAGS}
    order, bm25 = expected(cluster.url, tiny_model, QUERY)
    direct = es_client(node, cluster.url, cluster.major, {"op": "search", "params": params})
    got = es_client(node, cluster.proxy_url, cluster.major, {"op": "search", "params": params})

    assert got["status"] == 200
    assert got["headers"]["x-rerank-status"] == "reranked"
    assert ids(got["body"]) == order[:5] != bm25[:5]
    assert [h["_source"] for h in got["body"]["hits"]["hits"]] == [{"title": TITLES[i]} for i in order[:5]]
    assert got["body"]["hits"]["total"] == direct["body"]["hits"]["total"]
    assert got["body"]["aggregations"] == direct["body"]["aggregations"]


def test_msearch(cluster: Cluster, node: str, tiny_model: Path) -> None:
    """``client.msearch``: each sub-search reranked or skipped with its reason, as the items header
    says; totals and aggregations the server's own; a sorted sub-search exactly the server's."""
    searches: list[dict[str, Any]] = [
        {},  # the URL's index
        {"query": MATCH, "size": 5, "aggs": TAGS},
        {"index": INDEX},
        {"query": {"match": {"text": BREAD}}, "size": 3, "from": 2},
        {},
        {"query": MATCH, "size": 4, "sort": [{"year": "desc"}]},
    ]
    spec = {"op": "msearch", "params": {"index": INDEX, "searches": searches}}
    coffee, coffee_bm25 = expected(cluster.url, tiny_model, QUERY)
    bread, bread_bm25 = expected(cluster.url, tiny_model, BREAD)
    direct = es_client(node, cluster.url, cluster.major, spec)["body"]["responses"]
    got = es_client(node, cluster.proxy_url, cluster.major, spec)

    assert got["headers"]["x-rerank-items"] == "reranked,reranked,skipped:sort"
    assert got["headers"]["x-rerank-status"] == "reranked"
    answers = got["body"]["responses"]
    assert ids(answers[0]) == coffee[:5] != coffee_bm25[:5]
    assert ids(answers[1]) == bread[2:5] != bread_bm25[2:5]
    assert ids(answers[2]) == ids(direct[2])
    assert answers[2]["hits"] == direct[2]["hits"]
    assert answers[0]["aggregations"] == direct[0]["aggregations"]
    for mine, theirs in zip(answers, direct, strict=True):
        assert mine["hits"]["total"] == theirs["hits"]["total"]
        assert mine["status"] == theirs["status"] == 200


@pytest.mark.es8
def test_msearch_helper_batches_searches(
    es8_index: str, proxy: ProxyThread, node: str, tiny_model: Path
) -> None:
    """``client.helpers.msearch`` sends the three searches as one ``_msearch`` (the items header of the
    answer each search resolves with lists all three), and each comes back reranked."""
    texts = [QUERY, BREAD, TEA]
    sizes = [5, 3, 4]
    searches = [
        [{"index": INDEX}, {"query": {"match": {"text": t}}, "size": n}]
        for t, n in zip(texts, sizes, strict=True)
    ]
    spec = {"op": "helper", "operations": len(searches), "searches": searches}
    direct = es_client(node, es8_index, "8", spec)["items"]
    got = es_client(node, proxy.url, "8", spec)["items"]

    for text, size, mine, theirs in zip(texts, sizes, got, direct, strict=True):
        assert mine["headers"]["x-rerank-items"] == "reranked,reranked,reranked"
        assert mine["status"] == 200
        order, bm25 = expected(es8_index, tiny_model, text)
        assert ids(mine["body"]) == order[:size] != bm25[:size]
        assert mine["body"]["hits"]["total"] == theirs["body"]["hits"]["total"]


# -- Searchkit -------------------------------------------------------------------------------------------

SEARCHKIT_SETTINGS = {
    "search_attributes": [{"field": "title", "weight": 3}, "text"],
    "result_attributes": ["title", "tag"],  # the passage field stays hidden from the client
    "highlight_attributes": ["title"],
    "facet_attributes": [{"attribute": "tag", "field": "tag", "type": "string"}],
}
# What InstantSearch sends for a search box query with a refinement list on `tag`.
INSTANTSEARCH_PARAMS = {
    "query": QUERY,
    "facets": ["tag"],
    "hitsPerPage": 10,
    "maxValuesPerFacet": 10,
    "highlightPreTag": "__ais-highlight__",
    "highlightPostTag": "__/ais-highlight__",
    "tagFilters": "",
}


@dataclass(frozen=True)
class Searchkit:
    results: list[dict[str, Any]]  # InstantSearch results
    sent: list[tuple[dict[str, Any], dict[str, Any]]]  # the (header, body) pairs of its one _msearch
    headers: dict[str, str]  # the _msearch answer's headers


def searchkit(
    node: str, url: str, requests: list[dict[str, Any]], settings: dict[str, Any] = SEARCHKIT_SETTINGS
) -> Searchkit:
    out = run_js(node, "searchkit.mjs", url, spec={"search_settings": settings, "requests": requests})
    [exchange] = out["exchanges"]
    assert exchange["request"]["url"] == f"{url}/_msearch" and exchange["status"] == 200
    lines = [json.loads(line) for line in exchange["request"]["body"].splitlines()]
    return Searchkit(out["results"], list(zip(lines[::2], lines[1::2], strict=True)), exchange["headers"])


def searchkit_ids(result: dict[str, Any]) -> list[str]:
    return [h["objectID"] for h in result["hits"]]


def unscored(hit: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in hit.items() if k != "_score"}


def test_searchkit_query_is_reranked(es8_index: str, proxy: ProxyThread, node: str, tiny_model: Path) -> None:
    """Searchkit's query (multi_match over title and text, facet aggregation, ``_source`` without the
    passage) is reranked by the text the user typed; hit count, facets and hit contents as direct."""
    requests = [{"indexName": INDEX, "params": INSTANTSEARCH_PARAMS}]
    direct = searchkit(node, es8_index, requests)
    got = searchkit(node, proxy.url, requests)
    whole = searchkit(
        node, es8_index, [{"indexName": INDEX, "params": {**INSTANTSEARCH_PARAMS, "hitsPerPage": TOP_K}}]
    )
    assert got.sent == direct.sent  # the same query both ways: what the expectation is computed from
    [(header, body)] = got.sent
    order, server_order = expected(es8_index, tiny_model, QUERY, body)
    print(f"Searchkit ids, direct: {searchkit_ids(direct.results[0])}")
    print(f"Searchkit ids, through the proxy: {searchkit_ids(got.results[0])}")

    assert header == {"index": INDEX} and "sort" not in body
    assert got.headers.get("x-rerank-items") == "reranked"
    [mine], [theirs] = got.results, direct.results
    assert searchkit_ids(theirs) == server_order[:10]
    assert searchkit_ids(mine) == order[:10] != server_order[:10]
    assert mine["nbHits"] == theirs["nbHits"] and mine["nbPages"] == theirs["nbPages"]
    assert mine["facets"] == theirs["facets"]
    by_id = {h["objectID"]: unscored(h) for h in whole.results[0]["hits"]}
    for hit in mine["hits"]:  # highlights as Elasticsearch gave them; the passage still hidden
        assert unscored(hit) == by_id[hit["objectID"]]
        assert "text" not in hit and hit["title"] == TITLES[hit["objectID"]]


def test_searchkit_refinement(es8_index: str, proxy: ProxyThread, node: str, tiny_model: Path) -> None:
    """With a refinement, InstantSearch asks for the refined hits and, in a second search of size 0,
    the facet's counts without the refinement: the first is reranked, the second relayed
    (``size_zero``), in one _msearch."""
    refined = {**INSTANTSEARCH_PARAMS, "facetFilters": [["tag:coffee"]]}
    facet_counts = {**INSTANTSEARCH_PARAMS, "facets": "tag", "hitsPerPage": 0, "page": 0}
    facet_counts |= {"analytics": False, "clickAnalytics": False}
    requests = [{"indexName": INDEX, "params": refined}, {"indexName": INDEX, "params": facet_counts}]
    direct = searchkit(node, es8_index, requests)
    got = searchkit(node, proxy.url, requests)
    assert got.sent == direct.sent
    order, server_order = expected(es8_index, tiny_model, QUERY, got.sent[0][1])

    assert got.headers.get("x-rerank-items") == "reranked,skipped:size_zero"
    assert searchkit_ids(got.results[0]) == order[:10] != server_order[:10]
    assert searchkit_ids(direct.results[0]) == server_order[:10]
    assert {h["tag"] for h in got.results[0]["hits"]} == {"coffee"}
    for mine, theirs in zip(got.results, direct.results, strict=True):
        assert mine["nbHits"] == theirs["nbHits"]
        assert mine["facets"] == theirs["facets"]
    assert got.results[1]["hits"] == []


def test_searchkit_sorting_option_is_relayed(es8_index: str, proxy: ProxyThread, node: str) -> None:
    """A Searchkit configuration with sort options (its ``sorting`` setting, commonly with a
    ``default`` of ``_score`` descending) sends ``"sort": {"_score": "desc"}`` with every search, and
    a search with an explicit sort is never reranked (README, "What is reranked"): the results are
    Elasticsearch's, exactly."""
    settings = {
        **SEARCHKIT_SETTINGS,
        "sorting": {
            "default": {"field": "_score", "order": "desc"},
            "_year_desc": {"field": "year", "order": "desc"},
        },
    }
    requests = [{"indexName": INDEX, "params": INSTANTSEARCH_PARAMS}]
    direct = searchkit(node, es8_index, requests, settings)
    got = searchkit(node, proxy.url, requests, settings)

    assert got.sent == direct.sent and got.sent[0][1]["sort"] == {"_score": "desc"}
    assert got.headers["x-rerank-status"] == "skipped"
    assert got.headers["x-rerank-items"] == "skipped:sort"
    [mine], [theirs] = got.results, direct.results
    assert {**mine, "processingTimeMS": 0} == {**theirs, "processingTimeMS": 0}
