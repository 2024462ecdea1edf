"""``_source`` against the real servers of the matrix (tests/servers.py), expected values from their
own answers:

- the URL parameters (and the body they replace) are read as the server reads them
  (``FetchSourceContext``), edge cases included;
- the widened request the proxy sends draws exactly the ``Warning`` headers (and the status) of the
  client's own request, and cutting its hits back gives the client's ``_source``;
- the reference model of source filtering that the property tests stand on (tests/source_model.py)
  agrees with the server on generated documents and filters.
"""

from __future__ import annotations

import itertools
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.search_response import passage_text
from proxy.source_filter import (
    SOURCE_PARAMS,
    SourceFilterError,
    parse_source_filter,
    plan_source,
    restore_hit,
)
from proxy.source_semantics import Engine

from .servers import SERVERS, ServerPool, ServerSpec
from .source_model import reference_filter
from .strategies import documents, pattern_lists

pytestmark = pytest.mark.integration

ABSENT = object()  # no ``_source`` in the body
_request_ids = itertools.count()
FIELDS = ("text",)
# One document that tells the readings apart: fields named like the words a lax parser would take
# for booleans, an object, and a field name with a dot.
PARSE_DOC = {
    "title": "T",
    "author": "A",
    "text": "P",
    "1": "one",
    "0": "zero",
    "yes": "y",
    "no": "n",
    "on": "o",
    "off": "f",
    "TRUE": "T!",
    "True": "t!",
    "FALSE": "F!",
    "true": "tv",
    "a": {"b": "ab", "c": "ac"},
    "a.b": "dotted",
}
WARN_DOCS = {
    "w1": {
        "title": "Coffee",
        "text": "coffee brewed with water",
        "tag": "x",
        "meta": {"lang": "en", "note": "n"},
    },
    "w2": {"title": "Tea", "text": "tea leaves", "secret": "s", "meta": {"lang": "de"}},
}


@dataclass(frozen=True)
class Target:
    spec: ServerSpec
    url: str
    index: str

    @property
    def engine(self) -> Engine:
        return "opensearch" if self.spec.distribution == "opensearch" else "elasticsearch"

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, list[str], Any]:
        """Status, ``Warning`` headers and parsed answer (error statuses included)."""
        data = None if body is None else json.dumps(body).encode()
        # OpenSearch sends a deprecation warning once per message and X-Opaque-Id: a fresh id per
        # request makes every request get its own.
        headers = {"Content-Type": "application/json", "X-Opaque-Id": f"rerank-source-{next(_request_ids)}"}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.headers.get_all("Warning") or [], json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get_all("Warning") or [], json.loads(err.read())

    def search(
        self, source: Any, query_string: str = "", ids: list[str] | None = None
    ) -> tuple[int, list[str], Any]:
        body: dict[str, Any] = {"size": 100, "query": {"ids": {"values": ids}} if ids else {"match_all": {}}}
        if source is not ABSENT:
            body["_source"] = source
        return self.request("POST", f"/{self.index}/_search?{query_string}", body)

    def index_docs(self, docs: dict[str, dict[str, Any]]) -> None:
        lines = "".join(
            json.dumps({"index": {"_id": i}}) + "\n" + json.dumps(d) + "\n" for i, d in docs.items()
        )
        req = urllib.request.Request(
            f"{self.url}/{self.index}/_bulk?refresh=true",
            data=lines.encode(),
            method="POST",
            headers={"Content-Type": "application/x-ndjson"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        assert not answer["errors"], answer["items"][:3]


@pytest.fixture(
    scope="module",
    params=[pytest.param(s, marks=getattr(pytest.mark, s.marker), id=s.marker) for s in SERVERS],
)
def target(request: pytest.FixtureRequest, server_pool: ServerPool) -> Iterator[Target]:
    """One server with a throwaway index whose documents are kept out of any mapping (so one field
    may be an object in one document and a string in the next)."""
    spec: ServerSpec = request.param
    server = Target(spec, server_pool.url(spec.marker), f"rerank-source-{os.getpid()}")
    server.request("DELETE", f"/{server.index}")
    status, _, answer = server.request("PUT", f"/{server.index}", {"mappings": {"dynamic": False}})
    assert status == 200, answer
    server.index_docs({"parse": PARSE_DOC, **WARN_DOCS})
    yield server
    server.request("DELETE", f"/{server.index}")


# --- 1. the URL parameters ---------------------------------------------------------------------------

URL_CASES = [
    # _source_includes replaces the includes _source gave, whatever the order
    "_source=title&_source_includes=author",
    "_source_includes=author&_source=title",
    "_source=title&_source_includes=",
    # only "true" and "false" are booleans; everything else is a pattern
    *(
        f"_source={word}"
        for word in ["true", "false", "1", "0", "yes", "no", "on", "off", "TRUE", "True", "FALSE"]
    ),
    "_source=%20true",
    # empty values
    "_source=",
    "_source",
    "_source_includes=",
    "_source_excludes=",
    "_source=,",
    # false wins over includes and excludes
    "_source=false&_source_includes=title",
    "_source=false&_source_excludes=title",
    "_source=true&_source_includes=title",
    # excludes alone, and with includes
    "_source_excludes=title",
    "_source_excludes=a.b,title",
    "_source=a,title&_source_excludes=a.b",
    "_source=title&_source_excludes=",
    # comma lists: empty entries, blanks, trimming (path filtering trims, map filtering does not)
    "_source=title,,author",
    "_source=,title",
    "_source=title,",
    "_source=%20title",
    "_source=title%20",
    "_source=%20",
    "_source=%20title&_source_excludes=zz*",
    "_source=a.*",
    "_source=*.b",
    # a repeated parameter: the last one
    "_source=title&_source=author",
]
BODY_AND_URL_CASES = [
    ({"includes": ["author"]}, "_source_excludes=title"),  # the URL replaces the body as a whole
    (["author"], "_source=false"),
    ({"include": ["author"]}, "_source=title"),
    ({"bogus": ["author"]}, "_source=title"),  # the body is still parsed, and refused
    ({"includes": [1]}, ""),
    ({"include": "title", "includes": "author"}, ""),
    ({"includes": "author", "include": "title"}, ""),
    ([1, True], ""),
    ("", ""),
]
# Accepted by some servers and refused by others: the proxy does not rewrite them.
LEFT_TO_SERVER = [[1, True]]


def _case_id(source: Any, query_string: str) -> str:
    return ("" if source is ABSENT else json.dumps(source)) + (f"?{query_string}" if query_string else "")


READ_CASES = [*((ABSENT, qs) for qs in URL_CASES), *BODY_AND_URL_CASES]


@pytest.mark.parametrize(("body_source", "query_string"), READ_CASES, ids=[_case_id(*c) for c in READ_CASES])
def test_source_is_read_like_the_server(target: Target, body_source: Any, query_string: str) -> None:
    status, _, answer = target.search(body_source, query_string, ids=["parse"])
    params = dict(parse_qsl(query_string, keep_blank_values=True))
    try:
        flt = parse_source_filter(None if body_source is ABSENT else body_source, params)
    except SourceFilterError:  # left to the server: one that refuses it, or one of LEFT_TO_SERVER
        assert status == 400 or body_source in LEFT_TO_SERVER, answer
        return
    assert status == 200, answer
    hit = answer["hits"]["hits"][0]
    if not flt.fetch:
        assert "_source" not in hit
    else:
        assert hit["_source"] == reference_filter(
            PARSE_DOC, list(flt.includes), list(flt.excludes), target.engine
        )


# --- 2. warnings ---------------------------------------------------------------------------------------

WARNING_CASES = [
    ({"include": ["title"]}, ""),  # Elasticsearch: deprecated key; the old widening lost its warning
    ({"include": "title"}, ""),
    ({"exclude": "text"}, ""),
    ({"exclude": ["text", "secret"]}, ""),
    ({"include": ["title"], "exclude": ["text"]}, ""),
    ({"include": ["title"], "includes": ["title", "tag"]}, ""),
    ({"includes": ["title"]}, ""),
    ({"excludes": ["text"]}, ""),  # OpenSearch 3: the old {"includes": [], "excludes": []} drew 3
    ({"includes": [], "excludes": ["text"]}, ""),
    ({"includes": ["title"], "excludes": []}, ""),
    (False, ""),
    ("title", ""),
    (["title", "meta.*"], ""),
    ({"excludes": ["t*", "meta.note"]}, ""),  # map filtering on Elasticsearch: the whole _source
    ({"includes": ["text", "tag"], "excludes": ["text"]}, ""),  # OpenSearch 3 refuses both
    (ABSENT, "_source=false"),
    (ABSENT, "_source_excludes=text"),
    (ABSENT, "_source=title&_source_includes=tag"),
    ({"include": ["tag"]}, "_source_excludes=text"),  # the body's deprecated key warns, the URL wins
    ({"includes": [], "excludes": []}, "_source_excludes=text"),
    (ABSENT, "_source=false&_source_includes=title&_source_excludes=title"),
]


@pytest.mark.parametrize(
    ("client_source", "query_string"), WARNING_CASES, ids=[_case_id(*c) for c in WARNING_CASES]
)
def test_widened_search_draws_the_clients_own_warnings(
    target: Target, client_source: Any, query_string: str
) -> None:
    """The request the proxy sends in place of the client's (``_source`` widened, the URL's
    ``_source`` parameters dropped) gets the same status and ``Warning`` headers as the client's
    own, and its hits cut back are the client's."""
    params = dict(parse_qsl(query_string, keep_blank_values=True))
    flt = parse_source_filter(None if client_source is ABSENT else client_source, params)
    patch = plan_source(flt, FIELDS, target.engine)
    assert patch is not None, "every case hides the passage field"
    widened_query = "&".join(f"{k}={v}" for k, v in parse_qsl(query_string, True) if k not in SOURCE_PARAMS)

    status, warnings, direct = target.search(client_source, query_string, ids=list(WARN_DOCS))
    w_status, w_warnings, widened = target.search(
        patch.upstream.to_body(), widened_query, ids=list(WARN_DOCS)
    )

    assert (w_status, w_warnings) == (status, warnings), patch.upstream.to_body()
    if status != 200:
        return
    expected = {h["_id"]: h.get("_source", ABSENT) for h in direct["hits"]["hits"]}
    for hit in widened["hits"]["hits"]:
        assert passage_text(hit, FIELDS) == WARN_DOCS[hit["_id"]]["text"]
        restore_hit(hit, patch)
        assert hit.get("_source", ABSENT) == expected[hit["_id"]]


# --- 3. the reference model ------------------------------------------------------------------------------

_example = itertools.count()


@settings(max_examples=30)
@given(
    docs=st.lists(documents, min_size=1, max_size=6),
    filters=st.lists(st.tuples(pattern_lists, pattern_lists), min_size=1, max_size=4),
)
def test_reference_model_agrees_with_the_server(
    target: Target, docs: list[dict[str, Any]], filters: list[tuple[list[str], list[str]]]
) -> None:
    batch = {f"m{next(_example)}-{i}": doc for i, doc in enumerate(docs)}
    target.index_docs(batch)
    for includes, excludes in filters:
        status, _, answer = target.search({"includes": includes, "excludes": excludes}, ids=list(batch))
        if status == 400 and target.spec.distribution == "opensearch" and set(includes) & set(excludes):
            continue  # OpenSearch 3 refuses a pattern both included and excluded
        assert status == 200, answer
        got = {h["_id"]: h["_source"] for h in answer["hits"]["hits"]}
        want = {i: reference_filter(doc, includes, excludes, target.engine) for i, doc in batch.items()}
        assert got == want, (includes, excludes)
