"""The proxy's own errors and the one table that turns them into HTTP answers.

Errors are raised in the core as these domain types and rendered in one place (the app's middleware)
as Elasticsearch-shaped JSON, so a client's existing error handling keeps working. Elasticsearch's
own error responses never pass through here: they are forwarded verbatim.
"""

from __future__ import annotations

from typing import Any


class ProxyError(Exception):
    """Base class: ``status`` and ``es_type`` say how the client sees it."""

    status = 500
    es_type = "proxy_exception"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadRequest(ProxyError):
    """A request option the proxy itself reads (override, size, _source) is malformed."""

    status = 400
    es_type = "illegal_argument_exception"


class BodyTooLarge(ProxyError):
    status = 413
    es_type = "content_too_long_exception"


class UpstreamUnavailable(ProxyError):
    """Elasticsearch could not be reached or dropped the connection."""

    status = 502
    es_type = "upstream_unavailable_exception"


class UpstreamTimeout(ProxyError):
    """Elasticsearch did not answer within ``upstream.timeout_s``."""

    status = 504
    es_type = "upstream_timeout_exception"


class RerankFailed(Exception):
    """The scorer failed or ran out of time; the search is answered in Elasticsearch's order.

    ``reason`` is a short machine-readable word for the ``X-Rerank-Reason`` header.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


def es_error_body(status: int, es_type: str, reason: str) -> dict[str, Any]:
    """The JSON shape Elasticsearch uses for errors, which every client already parses."""
    cause = {"type": es_type, "reason": reason}
    return {"error": {"root_cause": [cause], **cause}, "status": status}
