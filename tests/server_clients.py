"""Each server's own official Python client, behind one small search interface for the matrix tests.

Users talk to the proxy with the client made for their server, so the matrix drives each server with
that client, through the proxy and directly:

- Elasticsearch 8: ``elasticsearch`` 8.x, the version installed in ``.venv``.
- Elasticsearch 9: ``elasticsearch`` 9.x. It cannot share an environment with 8.x (same package name,
  and each needs its own ``elastic-transport``), and 8.x must stay for the default 8.x server, which
  refuses a 9.x client's ``compatible-with=9``. So ``scripts/install.sh`` installs 9.x with
  ``pip install --target .venv/es9-client``, and the tests run this module as a worker subprocess with
  that folder first on ``PYTHONPATH``: the worker imports the 9.x client and runs the same
  ``elasticsearch_search`` as the 8.x case for each search it is sent, answering in JSON. Each answer
  names the client's version and is refused unless it is 9.x, so a missing folder fails instead of
  quietly testing the 8.x client again.
- OpenSearch 2 and 3: ``opensearch-py`` (no product check, no ``X-Elastic-Product``).

``search`` takes the elasticsearch-py keyword arguments the tests use (``query``, ``q``, ``size``,
``from_``, ``source``, ``source_includes``, ``source_excludes``) and answers with status, headers and
body whether the server succeeded or raised an error through the client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
ES9_CLIENT = ROOT / ".venv" / "es9-client"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: Any
    client_version: str


class SearchClient(Protocol):
    def search(self, index: str, **kwargs: Any) -> Answer: ...

    def close(self) -> None: ...


def elasticsearch_search(client: Any, index: str, kwargs: dict[str, Any]) -> Answer:
    """One search with an ``elasticsearch.Elasticsearch`` of whichever version this interpreter has."""
    import elasticsearch

    try:
        resp = client.search(index=index, **kwargs)
        meta, body = resp.meta, resp.body
    except elasticsearch.ApiError as e:
        meta, body = e.meta, e.body
    headers = {k.lower(): v for k, v in meta.headers.items()}
    return Answer(meta.status, headers, body, elasticsearch.__versionstr__)  # type: ignore[attr-defined]


class Elasticsearch8:
    def __init__(self, url: str) -> None:
        import elasticsearch

        self.client = elasticsearch.Elasticsearch(url, request_timeout=30)

    def search(self, index: str, **kwargs: Any) -> Answer:
        return elasticsearch_search(self.client, index, kwargs)

    def close(self) -> None:
        self.client.close()


class Elasticsearch9:
    """The 9.x client, in a worker subprocess (see the module docstring) that reads one search a line
    as JSON on stdin and answers one line on stdout."""

    def __init__(self, url: str) -> None:
        if not (ES9_CLIENT / "elasticsearch").is_dir():
            raise RuntimeError(f"{ES9_CLIENT} is missing: run `make install`")
        self._worker = subprocess.Popen(
            [sys.executable, "-m", "tests.server_clients", url],
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ES9_CLIENT), str(ROOT)])},
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def search(self, index: str, **kwargs: Any) -> Answer:
        assert self._worker.stdin is not None and self._worker.stdout is not None
        self._worker.stdin.write(json.dumps({"index": index, "kwargs": kwargs}) + "\n")
        self._worker.stdin.flush()
        line = self._worker.stdout.readline()
        if not line:
            raise RuntimeError("the elasticsearch 9 client's worker died (its stderr is in the test output)")
        answer = Answer(**json.loads(line))
        if not answer.client_version.startswith("9."):
            raise RuntimeError(f"expected the 9.x client from {ES9_CLIENT}, got {answer.client_version}")
        return answer

    def close(self) -> None:
        assert self._worker.stdin is not None and self._worker.stdout is not None
        self._worker.stdin.close()  # the worker's loop ends
        self._worker.wait(timeout=30)
        self._worker.stdout.close()


# elasticsearch-py's keyword -> (where opensearch-py wants it, its name there)
_OPENSEARCH_ARGS = {
    "query": ("body", "query"),
    "size": ("body", "size"),
    "from_": ("body", "from"),
    "source": ("body", "_source"),
    "q": ("params", "q"),
    "source_includes": ("params", "_source_includes"),
    "source_excludes": ("params", "_source_excludes"),
}


class OpenSearchPy:
    def __init__(self, url: str) -> None:
        import opensearchpy
        from opensearchpy import OpenSearch, Urllib3HttpConnection

        class HeaderRecording(Urllib3HttpConnection):
            """Keeps the last answer's status and headers: opensearch-py's API returns bodies only,
            and the tests read the proxy's X-Rerank-* headers."""

            last_status = 0
            last_headers: dict[str, str] = {}  # noqa: RUF012

            def perform_request(self, *args: Any, **kwargs: Any) -> Any:
                status, headers, data = super().perform_request(*args, **kwargs)
                self.last_status = status
                self.last_headers = {k.lower(): v for k, v in headers.items()}
                return status, headers, data

            def get_response_headers(self, response: Any) -> Any:  # read on error answers
                self.last_headers = super().get_response_headers(response)
                return self.last_headers

        self._errors = opensearchpy.TransportError
        self.version = opensearchpy.__versionstr__
        self.client = OpenSearch(url, connection_class=HeaderRecording, timeout=30)

    def search(self, index: str, **kwargs: Any) -> Answer:
        body: dict[str, Any] = {}
        params: dict[str, Any] = {}
        for key, value in kwargs.items():
            where, name = _OPENSEARCH_ARGS[key]
            (body if where == "body" else params)[name] = value
        connection = self.client.transport.get_connection()
        try:
            resp, status = self.client.search(index=index, body=body, **params), connection.last_status
        except self._errors as e:
            resp, status = e.info, int(e.status_code)
        return Answer(status, dict(connection.last_headers), resp, self.version)

    def close(self) -> None:
        self.client.close()


def official_client(distribution: str, major: int, url: str) -> SearchClient:
    if distribution == "opensearch":
        return OpenSearchPy(url)
    return Elasticsearch9(url) if major >= 9 else Elasticsearch8(url)


if __name__ == "__main__":  # the Elasticsearch 9 worker: python -m tests.server_clients URL
    import elasticsearch

    with elasticsearch.Elasticsearch(sys.argv[1], request_timeout=30) as es:
        for request in sys.stdin:
            search = json.loads(request)
            print(
                json.dumps(elasticsearch_search(es, search["index"], search["kwargs"]).__dict__), flush=True
            )
