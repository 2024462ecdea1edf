"""A small corpus for integration tests: enough overlapping words that a query matches ~30 docs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

_TOPICS = [
    ("coffee", "Coffee brewing", "Brewing coffee with a french press needs coarse grounds and four minutes"),
    ("coffee", "Espresso basics", "Espresso coffee is brewed by forcing hot water through fine grounds"),
    ("coffee", "Cold brew", "Cold brew coffee steeps coarse grounds in cold water for a full day"),
    ("tea", "Green tea", "Green tea should be brewed with water below boiling for two minutes"),
    ("tea", "Black tea", "Black tea is brewed with boiling water and steeped for four minutes"),
    ("bread", "Sourdough", "Sourdough bread rises slowly with a wild yeast starter and water"),
    ("bread", "Baguette", "A baguette is a long french bread with a crisp crust"),
    ("search", "BM25", "BM25 ranks documents by term frequency and inverse document frequency"),
    ("search", "Rerankers", "A cross encoder reranks the top documents of a first stage search"),
    ("search", "Elasticsearch", "Elasticsearch is a search engine built on Apache Lucene"),
]
_EXTRAS = [
    "a note on water temperature",
    "tips for beginners at home",
    "the history of the method",
    "common mistakes and how to fix them",
]


def _docs() -> list[dict[str, Any]]:
    docs = []
    n = 0
    for extra_i, extra in enumerate(_EXTRAS):
        for tag, title, text in _TOPICS:
            n += 1
            docs.append(
                {
                    "id": str(n),
                    "title": f"{title} {extra_i + 1}",
                    "text": f"{text}, with {extra}.",
                    "tag": tag,
                    "year": 2000 + n,
                    "meta": {"lang": "en", "summary": f"{title} summary"},
                }
            )
    return docs


DOCS = _docs()
# The index mapping the integration tests give the corpus.
MAPPINGS: dict[str, Any] = {
    "properties": {
        "title": {"type": "text"},
        "text": {"type": "text"},
        "tag": {"type": "keyword"},
        "year": {"type": "integer"},
        "meta": {"properties": {"lang": {"type": "keyword"}, "summary": {"type": "text"}}},
    }
}


def create_index(client: Any, name: str, docs: list[dict[str, Any]], **settings: Any) -> None:
    """(Re)create ``name`` with :data:`MAPPINGS` on one shard and index ``docs`` (their ``id`` is the
    ``_id``), refreshed: what every integration module needs before it searches."""
    client.options(ignore_status=404).indices.delete(index=name)
    client.indices.create(
        index=name, mappings=MAPPINGS, settings={"number_of_shards": 1, "number_of_replicas": 0, **settings}
    )
    from elasticsearch import helpers

    helpers.bulk(
        client, ({"_index": name, "_id": d["id"], **{k: v for k, v in d.items() if k != "id"}} for d in docs)
    )
    client.indices.refresh(index=name)


def index_fixture(*indices: tuple[Any, ...]) -> Any:
    """A module's ``es`` fixture: a client of the session's server (``es_url``) once each index is
    (re)created by :func:`create_index`; an index is ``(name, docs)`` or ``(name, docs, settings)``."""
    import pytest
    from elasticsearch import Elasticsearch

    @pytest.fixture(scope="module", name="es")
    def es(es_url: str) -> Iterator[Any]:
        client = Elasticsearch(es_url)
        for name, docs, *settings in indices:
            create_index(client, name, docs, **(settings[0] if settings else {}))
        yield client
        client.close()

    return es
