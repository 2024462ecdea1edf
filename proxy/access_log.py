"""The access log and the process's log lines, as plain text or as one JSON object per line.

One access line per request, written by aiohttp once the answer is sent (:class:`AccessLog`, its
``access_log_class``): the method, the path with the query string's parameter names but none of its
values, the status, what reranking did and why (the request's
:class:`~proxy.request_record.RequestRecord`), the milliseconds spent waiting for Elasticsearch and
for the model, and the total. Nothing else of the request is read, so a header (``Authorization``,
``ApiKey``, a cookie), a body or a query value can never reach the log.

``server.log_format: json`` makes every log line of the process one JSON object
(:class:`JsonFormatter`); the access fields are then keys of their own rather than words of the
message, so a log pipeline needs no pattern to parse them.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from .request_record import RECORD_KEY

__all__ = ["ACCESS_FIELDS", "AccessLog", "JsonFormatter", "PlainFormatter", "logged_target"]

# The keys an access record carries in JSON, in this order; plain lines hold the same values.
ACCESS_FIELDS = (
    "remote",
    "method",
    "path",
    "status",
    "route",
    "outcome",
    "reason",
    "upstream_ms",
    "scoring_ms",
    "total_ms",
)
_ACCESS = "access"  # the LogRecord attribute holding an access line's fields


def logged_target(request: BaseRequest) -> str:
    """The path as sent, and the query string's parameter names without their values
    (``/i/_search?q&size``): which options a client used is worth knowing, their values may be
    secrets or personal data."""
    url = request.rel_url
    names = list(dict.fromkeys(url.query.keys()))
    return url.raw_path + ("?" + "&".join(names) if names else "")


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


class AccessLog(AbstractAccessLogger):
    """aiohttp's access logger for the client-facing listener: one INFO record per request on the
    ``aiohttp.access`` logger. ``log_format`` (aiohttp's format string) is unused: the fields are fixed
    so that neither a header nor a query value can be configured into the log."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        record = request.get(RECORD_KEY)  # absent for requests that never reached the app
        fields: dict[str, Any] = {
            "remote": request.remote,
            "method": request.method,
            "path": logged_target(request),
            "status": response.status,
            "route": record.route if record else None,
            "outcome": record.outcome if record else None,
            "reason": record.reason if record else None,
            "upstream_ms": round(record.upstream_ms, 1) if record else None,
            "scoring_ms": round(record.scoring_ms, 1) if record else None,
            "total_ms": _ms(time),
        }
        self.logger.info("%s", _plain(fields), extra={_ACCESS: fields})

    @property
    def enabled(self) -> bool:
        """Skips building the line when INFO is off (``server.log_level: warning``)."""
        return self.logger.isEnabledFor(logging.INFO)


def _plain(fields: dict[str, Any]) -> str:
    """``127.0.0.1 "POST /i/_search?size" 200 search reranked - upstream_ms=12.1 scoring_ms=30.4
    total_ms=45.0``: ``-`` for what a request has not got (no rerank outcome, no reason)."""
    words = [str(fields["remote"] or "-"), f'"{fields["method"]} {fields["path"]}"', str(fields["status"])]
    words += [str(fields[key] or "-") for key in ("route", "outcome", "reason")]
    timings = ("upstream_ms", "scoring_ms", "total_ms")
    words += [f"{key}={fields[key]}" for key in timings if fields[key] is not None]
    return " ".join(words)


class PlainFormatter(logging.Formatter):
    """``2025-01-01 12:00:00,000 INFO proxy: message``: the process's plain log lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``,
    ``message``, an access line's fields as keys of their own, and ``exception`` (the traceback as
    one string) when the record has one. A message never spans lines, so a log shipper reading
    line by line never splits an event."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, _ACCESS, None)
        if isinstance(access, dict):
            out.update(access)
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return orjson.dumps(out, default=str).decode()


def _utc(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"
