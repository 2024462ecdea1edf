"""What one client request did, kept on the request for the access log and the metrics.

The search pipeline and the relay fill it in as the request goes (route kind, rerank outcome, time
spent waiting for Elasticsearch and for the model); the app's middleware starts it, and the access
log and the metrics read it once the answer is sent. Nothing here holds a header value, a body or a
query string's values, so neither reader can leak one.

The code deep in a request (the pipeline's counting, :class:`~proxy.upstream.Upstream`) does not get
the request passed down to it: :func:`recording` makes the record the *current* one for the task
serving the request, and the ``note_*`` helpers write to whichever record is current, or do nothing
when there is none (the admin listener's readiness probe, start-up). Tasks a request starts (a
multi-search's concurrent sub-searches) inherit it, as context variables are copied into new tasks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from aiohttp import web

__all__ = [
    "RECORD_KEY",
    "RequestRecord",
    "current",
    "note_scoring",
    "note_search",
    "note_upstream",
    "record_of",
    "recording",
]


@dataclass
class RequestRecord:
    route: str = "passthrough"  # search, msearch or passthrough: a closed set, usable as a label
    # reranked or skipped; None for a pass-through (and a search that ended before any decision, a
    # 502 say). A multi-search is "reranked" when any sub-search was, else "skipped" with the first
    # sub-search's reason, as its X-Rerank-Status header says; ``searches`` has every item's.
    outcome: str | None = None
    reason: str | None = None  # why a search was not reranked (the X-Rerank-Reason value)
    upstream_ms: float = 0.0  # summed over every call to Elasticsearch this request made
    # Time spent in the model (queue wait included): the longest of the request's scorer calls; a
    # multi-search's run concurrently, so this is about their span, as X-Rerank-Took-Ms says.
    scoring_ms: float = 0.0
    searches: list[tuple[str, str | None]] = field(default_factory=list)  # (outcome, reason) each
    upstream_errors: list[str] = field(default_factory=list)  # kinds, see note_upstream


RECORD_KEY = web.RequestKey("rerank_record", RequestRecord)
_CURRENT: ContextVar[RequestRecord | None] = ContextVar("rerank_record", default=None)


def record_of(request: web.Request) -> RequestRecord:
    """The request's record, made on first use (requests that never reach the middleware get one too)."""
    record = request.get(RECORD_KEY)
    if record is None:
        record = RequestRecord()
        request[RECORD_KEY] = record
    return record


def current() -> RequestRecord | None:
    return _CURRENT.get()


@contextmanager
def recording(record: RequestRecord) -> Iterator[RequestRecord]:
    """``record`` is the current one while the block runs (and in the tasks it starts)."""
    token = _CURRENT.set(record)
    try:
        yield record
    finally:
        _CURRENT.reset(token)


def note_search(status: str, reason: str | None) -> None:
    """One (sub-)search's outcome; the request's own is reranked as soon as any search was."""
    record = _CURRENT.get()
    if record is None:
        return
    record.searches.append((status, reason))
    if status == "reranked":
        record.outcome, record.reason = status, None
    elif record.outcome is None:
        record.outcome, record.reason = status, reason


def note_scoring(ms: float) -> None:
    """One call to the scorer that took ``ms`` milliseconds."""
    record = _CURRENT.get()
    if record is not None:
        record.scoring_ms = max(record.scoring_ms, ms)


def note_upstream(seconds: float, error: str | None = None) -> None:
    """Time spent waiting for Elasticsearch, and the kind of error it ended in, if any: ``timeout``,
    ``unavailable`` (no connection, a dropped one, an answer that is not HTTP), ``http_5xx`` or
    ``http_429`` (Elasticsearch answered with that status)."""
    record = _CURRENT.get()
    if record is None:
        return
    record.upstream_ms += seconds * 1000
    if error is not None:
        record.upstream_errors.append(error)
