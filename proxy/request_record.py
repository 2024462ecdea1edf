"""What one client request did, kept on the request for the access log and the metrics.

The search pipeline and the relay fill it in as the request goes (route kind, rerank outcome, time
spent waiting for Elasticsearch and for the model); the app's middleware starts it, and the access
log and the metrics read it once the answer is sent. Nothing here holds a header value, a body or a
query string's values, so neither reader can leak one.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

__all__ = ["RECORD_KEY", "RequestRecord", "record_of"]


@dataclass
class RequestRecord:
    route: str = "passthrough"  # search, msearch or passthrough: a closed set, usable as a label
    outcome: str | None = None  # reranked, skipped...; None for a pass-through
    reason: str | None = None  # why a search was not reranked (the X-Rerank-Reason value)
    upstream_ms: float = 0.0  # summed over every call to Elasticsearch this request made
    scoring_ms: float = 0.0  # time spent in the model (queue wait included)


RECORD_KEY = web.RequestKey("rerank_record", RequestRecord)


def record_of(request: web.Request) -> RequestRecord:
    """The request's record, made on first use (requests that never reach the middleware get one too)."""
    record = request.get(RECORD_KEY)
    if record is None:
        record = RequestRecord()
        request[RECORD_KEY] = record
    return record
