"""Per-index rules with two models loaded in one proxy, against the real Elasticsearch.

Both models are tiny real cross-encoders loaded from the YAML configuration through the proxy's own
start-up (``load_scorer`` for each): the default one (seed 0) and ``second`` (seed 1, another random
network over the same vocabulary). A search is shown to be scored by its rule's model when the served
order and ``_score``s are that model's, computed here with plain transformers, and not the other's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from elasticsearch import Elasticsearch

from proxy.config_load import load_config

from .conftest import ProxyThread
from .corpus import DOCS, create_index
from .test_fidelity import _raw, post
from .tiny_model import build_tiny_cross_encoder, reference_scores

ENGLISH = "rules-en-docs"  # no rule: the default model, field text, top_k 20
GERMAN = "rules-de-docs"  # its rule: model second, field title, top_k 6
OFF = "rules-off"  # an alias of ENGLISH with a rule of its own that turns reranking off
EN_QUERY = "coffee brewed with water"
DE_QUERY = "coffee tea brewing basics"  # matches 16 titles
EN_TOP_K, DE_TOP_K = 20, 6


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [d["text"] for d in DOCS] + [d["title"] for d in DOCS]
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce-second"), texts, seed=1)


@pytest.fixture(scope="module")
def es(es_url: str) -> Iterator[Elasticsearch]:
    client = Elasticsearch(es_url)
    create_index(client, ENGLISH, DOCS)
    create_index(client, GERMAN, DOCS)
    client.indices.put_alias(index=ENGLISH, name=OFF)
    yield client
    client.close()


def config_file(folder: Path, es_url: str, default: Path, second: Path, mode: str = "serve") -> Path:
    settings = {
        "upstream": {"url": es_url, "timeout_s": 30},
        # float32: the expected orders are computed with plain float32 transformers
        "rerank": {
            "model": str(default),
            "device": "cpu",
            "dtype": "float32",
            "top_k": EN_TOP_K,
            "field": ["text"],
            "mode": mode,
        },
        "models": {"second": {"model": str(second)}},  # device and dtype from the rerank section
        "rules": [
            {"index": ["rules-de-*"], "model": "second", "field": ["title"], "top_k": DE_TOP_K},
            {"index": OFF, "enabled": False},
        ],
    }
    path = folder / f"rules-{mode}.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def proxy(
    es_url: str,
    es: Elasticsearch,
    tiny_model: Path,
    second_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyThread]:
    cfg = load_config(config_file(tmp_path_factory.mktemp("cfg"), es_url, tiny_model, second_model))
    server = ProxyThread(cfg).start()  # no scorer injected: both models load as in production
    yield server
    server.stop()


def ids(data: dict[str, Any]) -> list[str]:
    return [h["_id"] for h in data["hits"]["hits"]]


def head(es: Elasticsearch, index: str, field: str, query: str, top_k: int) -> tuple[list[str], list[str]]:
    """Elasticsearch's top_k ids for the query on ``field``, and their passages."""
    hits = es.search(index=index, query={"match": {field: query}}, size=top_k)["hits"]["hits"]
    return [h["_id"] for h in hits], [h["_source"][field] for h in hits]


def by_model(
    model: Path, query: str, hit_ids: list[str], passages: list[str]
) -> tuple[list[str], list[float]]:
    """The model's order of the hits and its scores in that order."""
    scores = reference_scores(model, query, passages)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return [hit_ids[i] for i in order], [scores[i] for i in order]


def search(base: str, index: str, field: str, query: str, size: int) -> tuple[dict[str, str], dict[str, Any]]:
    status, headers, raw = post(base, f"/{index}/_search", {"query": {"match": {field: query}}, "size": size})
    assert status == 200
    return headers, json.loads(raw)


def test_an_index_with_a_rule_is_scored_by_the_rules_model_field_and_top_k(
    proxy: ProxyThread, es: Elasticsearch, tiny_model: Path, second_model: Path
) -> None:
    hit_ids, titles = head(es, GERMAN, "title", DE_QUERY, DE_TOP_K)
    second_order, second_scores = by_model(second_model, DE_QUERY, hit_ids, titles)
    default_order, _ = by_model(tiny_model, DE_QUERY, hit_ids, titles)
    assert second_order != default_order  # the two models disagree here, so the order tells them apart

    headers, served = search(proxy.url, GERMAN, "title", DE_QUERY, size=8)
    assert headers["x-rerank-status"] == "reranked"
    hits = served["hits"]["hits"]
    assert ids(served)[:DE_TOP_K] == second_order
    assert [h["_score"] for h in hits[:DE_TOP_K]] == pytest.approx(second_scores, abs=1e-4)
    # Past the rule's top_k (6, not the rerank section's 20): Elasticsearch's order, unscored.
    assert ids(served)[DE_TOP_K:] == head(es, GERMAN, "title", DE_QUERY, 8)[0][DE_TOP_K:]
    assert [h["_score"] for h in hits[DE_TOP_K:]] == [None, None]
    assert "title" in hits[0]["_source"]


def test_an_index_without_a_rule_is_scored_by_the_default_model(
    proxy: ProxyThread, es: Elasticsearch, tiny_model: Path, second_model: Path
) -> None:
    hit_ids, texts = head(es, ENGLISH, "text", EN_QUERY, EN_TOP_K)
    default_order, default_scores = by_model(tiny_model, EN_QUERY, hit_ids, texts)
    assert default_order[:5] != by_model(second_model, EN_QUERY, hit_ids, texts)[0][:5]

    headers, served = search(proxy.url, ENGLISH, "text", EN_QUERY, size=5)
    assert headers["x-rerank-status"] == "reranked"
    assert ids(served) == default_order[:5]
    assert [h["_score"] for h in served["hits"]["hits"]] == pytest.approx(default_scores[:5], abs=1e-4)


def test_a_search_of_indices_with_different_rules_is_answered_in_elasticsearchs_order(
    proxy: ProxyThread, es: Elasticsearch
) -> None:
    both = f"{ENGLISH},{GERMAN}"
    headers, served = search(proxy.url, both, "text", EN_QUERY, size=10)
    assert (headers["x-rerank-status"], headers["x-rerank-reason"]) == ("skipped", "mixed_rules")
    direct = es.search(index=both, query={"match": {"text": EN_QUERY}}, size=10)
    assert [(h["_index"], h["_id"]) for h in served["hits"]["hits"]] == [
        (h["_index"], h["_id"]) for h in direct["hits"]["hits"]
    ]


def test_an_alias_goes_by_its_own_name(proxy: ProxyThread, es: Elasticsearch) -> None:
    """``rules-off`` is an alias of the English index, whose searches are reranked; the alias's own
    rule turns reranking off, because the alias is matched by its name."""
    headers, served = search(proxy.url, OFF, "text", EN_QUERY, size=5)
    assert (headers["x-rerank-status"], headers["x-rerank-reason"]) == ("skipped", "disabled")
    assert ids(served) == head(es, ENGLISH, "text", EN_QUERY, 5)[0]


def test_msearch_items_are_each_scored_by_their_rules_model(
    proxy: ProxyThread, es: Elasticsearch, tiny_model: Path, second_model: Path
) -> None:
    lines: list[dict[str, Any]] = [
        {"index": ENGLISH},
        {"query": {"match": {"text": EN_QUERY}}, "size": 4},
        {"index": GERMAN},
        {"query": {"match": {"title": DE_QUERY}}, "size": 3},
        {"index": [ENGLISH, GERMAN]},
        {"query": {"match": {"text": EN_QUERY}}, "size": 3},
        {},  # the URL's index: the German one
        {"query": {"match": {"title": DE_QUERY}}, "size": 2},
    ]
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    status, headers, raw = _raw(
        f"{proxy.url}/{GERMAN}/_msearch", "POST", body, {"Content-Type": "application/x-ndjson"}
    )
    assert status == 200
    assert headers["x-rerank-items"] == "reranked,reranked,skipped:mixed_rules,reranked"
    got = json.loads(raw)["responses"]
    english = by_model(tiny_model, EN_QUERY, *head(es, ENGLISH, "text", EN_QUERY, EN_TOP_K))[0]
    german = by_model(second_model, DE_QUERY, *head(es, GERMAN, "title", DE_QUERY, DE_TOP_K))[0]
    assert ids(got[0]) == english[:4]
    assert ids(got[1]) == german[:3]
    direct = es.search(index=[ENGLISH, GERMAN], query={"match": {"text": EN_QUERY}}, size=3)
    assert [h["_id"] for h in got[2]["hits"]["hits"]] == [h["_id"] for h in direct["hits"]["hits"]]
    assert ids(got[3]) == german[:2]


def test_shadow_mode_compares_with_the_rules_model(
    es_url: str,
    es: Elasticsearch,
    tiny_model: Path,
    second_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The background comparison scores the German index's head (its rule's top_k, on titles) with
    the rule's model: Kendall's tau between Elasticsearch's order and that model's is recorded."""
    hit_ids, titles = head(es, GERMAN, "title", DE_QUERY, DE_TOP_K)

    def tau(model: Path) -> float:
        s = reference_scores(model, DE_QUERY, titles)
        pairs = [(i, j) for i in range(len(s)) for j in range(i + 1, len(s))]
        return sum((s[i] > s[j]) - (s[i] < s[j]) for i, j in pairs) / len(pairs)

    assert tau(second_model) != pytest.approx(tau(tiny_model))
    path = config_file(tmp_path_factory.mktemp("cfg"), es_url, tiny_model, second_model, mode="shadow")
    server = ProxyThread(load_config(path)).start()
    try:
        headers, served = search(server.url, GERMAN, "title", DE_QUERY, size=3)
        figures: dict[str, Any] = {}
        for _ in range(200):  # the comparison runs after the answer
            figures = json.loads(_raw(server.admin_url + "/_rerank/stats")[2])["shadow"]
            if figures["compared"]:
                break
            time.sleep(0.05)
    finally:
        server.stop()
    assert headers["x-rerank-reason"] == "shadow"
    assert ids(served) == hit_ids[:3]
    assert figures["compared"] == 1
    assert figures["mean_kendall_tau"] == pytest.approx(tau(second_model))


def test_stats_report_each_loaded_models_queue(proxy: ProxyThread, es: Elasticsearch) -> None:
    """Each model has its own queue: a search on the German index moves the second model's counters
    only, and /_rerank/stats on the admin listener reports both models by name."""

    def models() -> dict[str, Any]:
        figures: dict[str, Any] = json.loads(_raw(proxy.admin_url + "/_rerank/stats")[2])["models"]
        return figures

    before = models()
    assert set(before) == {"default", "second"}
    headers, _ = search(proxy.url, GERMAN, "title", DE_QUERY, size=3)
    assert headers["x-rerank-status"] == "reranked"
    after = models()
    assert after["second"]["queue"]["items"] - before["second"]["queue"]["items"] == DE_TOP_K
    assert after["default"]["queue"]["items"] == before["default"]["queue"]["items"]
    assert after["second"]["model"] != after["default"]["model"]
