"""The search APIs applications send besides a plain ``_search``: ``filter_path``, ``_msearch``,
search templates and compressed answers, each against the real server.

Expected reranked orders are computed with plain transformers on the server's own hits.
"""

from __future__ import annotations

import copy
import gzip
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from elasticsearch import Elasticsearch

from .conftest import ProxyThread, make_config
from .corpus import DOCS, index_fixture
from .test_fidelity import _raw, post
from .tiny_model import reference_scores

pytestmark = pytest.mark.integration

INDEX = "rerank-search-apis"
OTHER = "rerank-search-apis-other"
TOP_K = 20  # the session proxy's top_k
QUERY = "coffee brewed with water"
MATCH = {"match": {"text": QUERY}}


es = index_fixture((INDEX, DOCS), (OTHER, [{"id": f"o{d['id']}", "text": d["title"]} for d in DOCS[:15]]))


def ids(data: dict[str, Any]) -> list[str]:
    return [h["_id"] for h in data["hits"]["hits"]]


def model_order(model: Path, text: str, hits: list[dict[str, Any]], field: str = "text") -> list[str]:
    scores = reference_scores(model, text, [h["_source"][field] for h in hits])
    return [hits[i]["_id"] for i in sorted(range(len(hits)), key=lambda i: -scores[i])]


def expected_order(
    es: Elasticsearch, model: Path, body: dict[str, Any], index: str = INDEX, text: str = QUERY
) -> list[str]:
    hits = es.search(index=index, body={**body, "from": 0, "size": TOP_K})["hits"]["hits"]
    return model_order(model, text, hits)


class FailingScorer:
    """A model that always fails: the proxy answers in Elasticsearch's order, but still filters the
    answer itself, which is what the filter_path table checks."""

    name = "failing"

    async def score(self, query: str, passages: Sequence[str]) -> list[float]:
        raise RuntimeError("no model here")

    async def aclose(self) -> None:
        pass


@pytest.fixture(scope="module")
def unscored_proxy(es_url: str, tiny_model: Path) -> Iterator[ProxyThread]:
    server = ProxyThread(make_config(es_url, tiny_model, top_k=TOP_K), scorer=FailingScorer()).start()
    yield server
    server.stop()


# -- filter_path --------------------------------------------------------------------------------------

FILTER_PATHS = [
    "hits.hits._id",
    "hits.hits._id,hits.total",
    "hits.hits._source",
    "hits.hits._source.title",
    "hits.hits._source.meta.lang",
    "hits.hits._source.m*",
    "hits.hits._source.*.lang",
    "hits.**._id",
    "**._id",
    "**.lang",
    "hits.total.value",
    "*.total",
    "hits.hits.*",
    "hits",
    "-hits.hits._source",
    "-hits.hits._source.text,-took",
    "-_shards.*",
    "-hits.hits",
    "-**._score",
    "hits.hits._id,-hits.hits._source",
    "hits.total,-hits.total.relation",
    "aggregations.tags.buckets.key",
    "aggregations.**",
    "nothing.here",
    "hits.hits._source.nothing",
    "took,,timed_out",
    "-nothing",
    "hits.hits.highlight",
]


def _without_took(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "took"}


def _body(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "query": MATCH,
        "size": TOP_K,
        "aggs": {"tags": {"terms": {"field": "tag"}}},
        "highlight": {"fields": {"text": {}}},
        **(extra or {}),
    }


@pytest.mark.parametrize("expression", FILTER_PATHS)
def test_filter_path_equals_elasticsearchs_own(
    es_url: str, unscored_proxy: ProxyThread, es: Elasticsearch, expression: str
) -> None:
    """The proxy filters the answer it serves; with the model's order out of the way (the model fails,
    Elasticsearch's order is served), that answer must be Elasticsearch's own filtered answer."""
    path = f"/{INDEX}/_search?filter_path={quote(expression)}"
    _, _, direct = post(es_url, path, _body())
    _, headers, proxied = post(unscored_proxy.url, path, _body())
    assert headers["x-rerank-reason"] == "rerank_error"  # through the pipeline, not relayed
    assert _without_took(json.loads(proxied)) == _without_took(json.loads(direct))


def _unordered(data: Any) -> Any:
    """The answer without what reranking changes: hit order, ``_score`` and ``max_score``."""
    data = copy.deepcopy(_without_took(data))
    hits = data.get("hits", {})
    hits.pop("max_score", None)
    if isinstance(hits.get("hits"), list):
        for hit in hits["hits"]:
            hit.pop("_score", None)
        hits["hits"].sort(key=lambda h: json.dumps(h, sort_keys=True))
    return data


@pytest.mark.parametrize("expression", FILTER_PATHS)
def test_filter_path_on_reranked_answers(
    es_url: str, proxy: ProxyThread, es: Elasticsearch, tiny_model: Path, expression: str
) -> None:
    """Reranked: the kept fields are Elasticsearch's, the order is the model's."""
    path = f"/{INDEX}/_search?filter_path={quote(expression)}"
    _, _, direct = post(es_url, path, _body())
    _, headers, proxied = post(proxy.url, path, _body())
    assert headers["x-rerank-status"] == "reranked"
    served = json.loads(proxied)
    assert _unordered(served) == _unordered(json.loads(direct))
    if served.get("hits", {}).get("hits") and "_id" in served["hits"]["hits"][0]:
        assert ids(served) == expected_order(es, tiny_model, {"query": MATCH})


def test_filter_path_on_a_page(proxy: ProxyThread, es: Elasticsearch, tiny_model: Path) -> None:
    _, _, raw = post(
        proxy.url, f"/{INDEX}/_search?filter_path=hits.hits._id", {"query": MATCH, "from": 3, "size": 4}
    )
    assert json.loads(raw) == {
        "hits": {"hits": [{"_id": i} for i in expected_order(es, tiny_model, {"query": MATCH})[3:7]]}
    }


# -- _msearch -----------------------------------------------------------------------------------------


def test_msearch_through_the_official_client(es: Elasticsearch, proxy: ProxyThread, tiny_model: Path) -> None:
    """Each sub-search is planned like a _search: reranked, skipped with its reason, or an error in
    its item, with Elasticsearch's totals and aggregations; the items header says which was which."""
    searches: list[dict[str, Any]] = [
        {"index": INDEX},
        {"query": MATCH, "size": 5, "aggs": {"tags": {"terms": {"field": "tag"}}}},
        {},  # the URL's index
        {"query": {"match": {"text": "sourdough bread starter"}}, "size": 3, "from": 2},
        {"index": INDEX},
        {"query": MATCH, "size": 4, "sort": [{"year": "desc"}]},
        {"index": "no-such-index"},
        {"query": MATCH},
        {"index": OTHER},
        {"query": MATCH, "size": 3, "_rerank": {"top_k": 5}},
    ]
    with Elasticsearch(proxy.url) as client:
        resp = client.msearch(index=INDEX, searches=searches, rest_total_hits_as_int=True)
    plain = [s for s in searches if "_rerank" not in s] + [{"query": MATCH, "size": 3}]
    direct = es.msearch(index=INDEX, searches=plain[:8] + plain[8:], rest_total_hits_as_int=True)
    got, want = resp["responses"], direct["responses"]
    assert (
        resp.meta.headers["X-Rerank-Items"]
        == "reranked,reranked,skipped:sort,skipped:upstream_rejected_rewrite,reranked"
    )
    assert resp.meta.headers["X-Rerank-Status"] == "reranked"
    assert ids(got[0]) == expected_order(es, tiny_model, {"query": MATCH})[:5]
    assert got[0]["aggregations"] == want[0]["aggregations"]
    assert got[0]["hits"]["total"] == want[0]["hits"]["total"]  # an int, as asked
    bread = {"query": {"match": {"text": "sourdough bread starter"}}}
    assert ids(got[1]) == expected_order(es, tiny_model, bread, text="sourdough bread starter")[2:5]
    assert got[2]["hits"]["hits"] == want[2]["hits"]["hits"]
    assert got[3] == want[3] and got[3]["status"] == 404
    other = es.search(index=OTHER, query=MATCH, size=5)["hits"]["hits"]
    assert ids(got[4]) == model_order(tiny_model, QUERY, other)[:3]
    assert [r["status"] for r in got] == [r["status"] for r in want]


def test_msearch_item_refused_when_widened_is_asked_again(
    es_url: str, proxy: ProxyThread, es: Elasticsearch
) -> None:
    """A sub-search whose widened form breaks an index limit goes up again as the client sent it."""
    es.indices.put_settings(index=OTHER, settings={"index.max_result_window": 12})
    try:
        body = (
            json.dumps({"index": OTHER})
            + "\n"
            + json.dumps({"query": MATCH, "size": 5})
            + "\n"
            + json.dumps({"index": INDEX})
            + "\n"
            + json.dumps({"query": MATCH, "size": 2})
            + "\n"
        ).encode()
        ndjson = {"Content-Type": "application/x-ndjson"}
        d_status, _, d_body = _raw(es_url + "/_msearch", "POST", body, ndjson)
        p_status, p_headers, p_body = _raw(proxy.url + "/_msearch", "POST", body, ndjson)
    finally:
        es.indices.put_settings(index=OTHER, settings={"index.max_result_window": None})
    assert d_status == p_status == 200
    assert p_headers["x-rerank-items"] == "skipped:upstream_rejected_rewrite,reranked"
    assert json.loads(p_body)["responses"][0]["hits"] == json.loads(d_body)["responses"][0]["hits"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"index": "rerank-search-apis"}\n{"query": {"match": {"text": "coffee"}}}',  # no final newline
        b'{"index": "rerank-search-apis"}\n{"query": {"match": {"text": "coffee"}}, "size": 1, "size": 2}\n',
        b'{"index": "rerank-search-apis"}\n{"query": \n',
        b'{"index": "rerank-search-apis"}\n',
    ],
)
def test_malformed_msearch_gets_elasticsearchs_answer(
    es_url: str, proxy: ProxyThread, es: Elasticsearch, body: bytes
) -> None:
    ndjson = {"Content-Type": "application/x-ndjson"}
    d_status, _, d_body = _raw(es_url + "/_msearch", "POST", body, ndjson)
    p_status, p_headers, p_body = _raw(proxy.url + "/_msearch", "POST", body, ndjson)
    assert (p_status, p_body) == (d_status, d_body)
    assert p_headers["x-rerank-reason"] == "invalid_body"


def test_msearch_with_filter_path_and_compat_media_type(
    proxy: ProxyThread, es: Elasticsearch, tiny_model: Path
) -> None:
    compat = "application/vnd.elasticsearch+x-ndjson; compatible-with=8"
    body = (json.dumps({"index": INDEX}) + "\n" + json.dumps({"query": MATCH, "size": 3}) + "\n").encode()
    status, headers, raw = _raw(
        proxy.url + "/_msearch?filter_path=responses.hits.hits._id",
        "POST",
        body,
        {"Content-Type": compat, "Accept": "application/vnd.elasticsearch+json; compatible-with=8"},
    )
    assert status == 200 and headers["x-rerank-items"] == "reranked"
    assert json.loads(raw) == {
        "responses": [
            {"hits": {"hits": [{"_id": i} for i in expected_order(es, tiny_model, {"query": MATCH})[:3]]}}
        ]
    }


def test_msearch_subsearches_are_counted(proxy: ProxyThread, es: Elasticsearch) -> None:
    def stats() -> dict[str, Any]:
        return json.loads(_raw(proxy.admin_url + "/_rerank/stats")[2])["searches"]

    before = stats()
    body = "".join(
        json.dumps(h) + "\n" + json.dumps(b) + "\n"
        for h, b in [({"index": INDEX}, {"query": MATCH, "size": 2})] * 3
        + [({"index": INDEX}, {"query": MATCH, "size": 0})]
    ).encode()
    _raw(proxy.url + "/_msearch", "POST", body, {"Content-Type": "application/x-ndjson"})
    after = stats()
    assert after["reranked"] - before["reranked"] == 3
    assert after["skipped"].get("size_zero", 0) - before["skipped"].get("size_zero", 0) == 1


# -- compression ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("accept", ["gzip", "gzip, deflate, br", None])
def test_reranked_answer_is_compressed_when_elasticsearch_would(
    es_url: str, proxy: ProxyThread, es: Elasticsearch, accept: str | None
) -> None:
    headers = {"Accept-Encoding": accept} if accept else {}
    _, d_headers, _ = post(es_url, f"/{INDEX}/_search", {"query": MATCH, "size": 3}, **headers)
    _, p_headers, p_body = post(proxy.url, f"/{INDEX}/_search", {"query": MATCH, "size": 3}, **headers)
    assert p_headers["x-rerank-status"] == "reranked"
    assert p_headers.get("content-encoding") == d_headers.get("content-encoding")
    data = gzip.decompress(p_body) if p_headers.get("content-encoding") == "gzip" else p_body
    assert len(ids(json.loads(data))) == 3


def test_msearch_answer_is_compressed_too(proxy: ProxyThread, es: Elasticsearch) -> None:
    body = (json.dumps({"index": INDEX}) + "\n" + json.dumps({"query": MATCH, "size": 2}) + "\n").encode()
    _, headers, raw = _raw(
        proxy.url + "/_msearch",
        "POST",
        body,
        {"Content-Type": "application/x-ndjson", "Accept-Encoding": "gzip"},
    )
    assert headers["content-encoding"] == "gzip" and headers["x-rerank-items"] == "reranked"
    assert len(json.loads(gzip.decompress(raw))["responses"][0]["hits"]["hits"]) == 2


# -- search templates ------------------------------------------------------------------------------------


def test_template_without_a_template_engine_answers_like_elasticsearch(
    es_url: str, proxy: ProxyThread, es: Elasticsearch
) -> None:
    """Elasticsearch's integ-test zip has no mustache: the proxy cannot render, so the client's request
    goes up as it is and gets Elasticsearch's own answer."""
    body = {"source": {"query": {"match": {"text": "{{q}}"}}, "size": 3}, "params": {"q": "coffee"}}
    (d_status, _, d_body), (p_status, p_headers, p_body) = (
        post(es_url, f"/{INDEX}/_search/template", body),
        post(proxy.url, f"/{INDEX}/_search/template", body),
    )
    assert (p_status, p_body) == (d_status, d_body)
    assert p_headers["x-rerank-reason"] == "template_not_rendered"


@pytest.fixture(scope="module")
def os3(opensearch3_url: str) -> str:
    """OpenSearch 3 with the corpus: its integ-test zip has lang-mustache, so templates render."""
    _raw(f"{opensearch3_url}/{INDEX}", "DELETE")
    bulk = "".join(
        json.dumps({"index": {"_index": INDEX, "_id": d["id"]}})
        + "\n"
        + json.dumps({k: v for k, v in d.items() if k != "id"})
        + "\n"
        for d in DOCS
    ).encode()
    status, _, _ = _raw(
        f"{opensearch3_url}/_bulk?refresh=true", "POST", bulk, {"Content-Type": "application/x-ndjson"}
    )
    assert status == 200
    template = {
        "script": {"lang": "mustache", "source": {"query": {"match": {"text": "{{q}}"}}, "size": "{{n}}"}}
    }
    assert post(opensearch3_url, "/_scripts/rerank-test-template", template)[0] == 200
    return opensearch3_url


@pytest.fixture(scope="module")
def os3_proxy(os3: str, tiny_model: Path) -> Iterator[ProxyThread]:
    server = ProxyThread(make_config(os3, tiny_model, top_k=TOP_K, field=("text",))).start()
    yield server
    server.stop()


def os3_order(base: str, model: Path, text: str) -> list[str]:
    hits = json.loads(post(base, f"/{INDEX}/_search", {"query": {"match": {"text": text}}, "size": TOP_K})[2])
    return model_order(model, text, hits["hits"]["hits"])


@pytest.mark.parametrize(
    "template",
    [
        {"source": {"query": {"match": {"text": "{{q}}"}}, "size": "{{n}}"}, "params": {"q": QUERY, "n": 4}},
        {"source": '{"query": {"match": {"text": "{{q}}"}}, "size": {{n}}}', "params": {"q": QUERY, "n": 4}},
        {"id": "rerank-test-template", "params": {"q": QUERY, "n": 4}},
    ],
    ids=["inline-object", "inline-string", "stored"],
)
def test_search_template_is_rendered_and_reranked(
    os3: str, os3_proxy: ProxyThread, tiny_model: Path, template: dict[str, Any]
) -> None:
    (d_status, _, d_body), (p_status, p_headers, p_body) = (
        post(os3, f"/{INDEX}/_search/template", template),
        post(os3_proxy.url, f"/{INDEX}/_search/template", template),
    )
    assert d_status == p_status == 200
    assert p_headers["x-rerank-status"] == "reranked"
    served, direct = json.loads(p_body), json.loads(d_body)
    assert ids(served) == os3_order(os3, tiny_model, QUERY)[:4]
    assert served["hits"]["total"] == direct["hits"]["total"]


def test_msearch_template_is_rendered_and_reranked(
    os3: str, os3_proxy: ProxyThread, tiny_model: Path
) -> None:
    lines = [
        {"index": INDEX},
        {"id": "rerank-test-template", "params": {"q": QUERY, "n": 3}},
        {"index": INDEX},
        {"source": {"query": {"match": {"text": "{{q}}"}}, "size": 2}, "params": {"q": "black tea boiling"}},
    ]
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    status, headers, raw = _raw(
        os3_proxy.url + "/_msearch/template", "POST", body, {"Content-Type": "application/x-ndjson"}
    )
    assert status == 200 and headers["x-rerank-items"] == "reranked,reranked"
    got = json.loads(raw)["responses"]
    assert ids(got[0]) == os3_order(os3, tiny_model, QUERY)[:3]
    assert ids(got[1]) == os3_order(os3, tiny_model, "black tea boiling")[:2]


def test_template_that_does_not_render_answers_like_the_server(os3: str, os3_proxy: ProxyThread) -> None:
    body = {"id": "no-such-template", "params": {"q": "coffee"}}
    (d_status, _, d_body), (p_status, p_headers, p_body) = (
        post(os3, f"/{INDEX}/_search/template", body),
        post(os3_proxy.url, f"/{INDEX}/_search/template", body),
    )
    assert d_status >= 400
    assert (p_status, p_body) == (d_status, d_body)
    assert p_headers["x-rerank-reason"] == "template_not_rendered"


def test_template_with_a_search_only_parameter_answers_like_the_server(
    os3: str, os3_proxy: ProxyThread
) -> None:
    """The template API parses ``size`` from the URL and then replaces it with the rendered body, where
    _search would apply it: the request goes up as sent and gets the server's own answer."""
    body = {"id": "rerank-test-template", "params": {"q": QUERY, "n": 4}}
    (d_status, _, d_body), (p_status, p_headers, p_body) = (
        post(os3, f"/{INDEX}/_search/template?size=2", body),
        post(os3_proxy.url, f"/{INDEX}/_search/template?size=2", body),
    )
    assert p_status == d_status
    assert _without_took(json.loads(p_body)) == _without_took(json.loads(d_body))
    assert p_headers["x-rerank-reason"] == "template_parameters"


def test_template_explain_flag_reaches_the_rendered_search(
    os3: str, os3_proxy: ProxyThread, tiny_model: Path
) -> None:
    body = {"id": "rerank-test-template", "params": {"q": QUERY, "n": 2}}
    _, headers, raw = post(os3_proxy.url, f"/{INDEX}/_search/template?explain=true&typed_keys", body)
    served = json.loads(raw)
    assert headers["x-rerank-status"] == "reranked"
    assert ids(served) == os3_order(os3, tiny_model, QUERY)[:2]
    assert all("_explanation" in h for h in served["hits"]["hits"])


@pytest.mark.parametrize("extra", [{"size": 0}, {"sort": ["_doc"]}])
def test_msearch_of_one_skipped_search_still_lists_its_item(
    proxy: ProxyThread, es: Elasticsearch, extra: dict[str, Any]
) -> None:
    body = (json.dumps({"index": INDEX}) + "\n" + json.dumps({"query": MATCH, **extra}) + "\n").encode()
    _, headers, _ = _raw(proxy.url + "/_msearch", "POST", body, {"Content-Type": "application/x-ndjson"})
    reason = "size_zero" if "size" in extra else "sort"
    assert (headers["x-rerank-status"], headers["x-rerank-items"]) == ("skipped", f"skipped:{reason}")
