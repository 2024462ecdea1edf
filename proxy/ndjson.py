"""The multi-search wire format: header/body line pairs, read strictly and written back.

Pure functions. Anything unusual (no final newline, an odd number of lines, a line that is not a JSON
object, a repeated key) makes :func:`parse_pairs` return None: the proxy then forwards the client's
bytes and Elasticsearch answers with its own error, so the proxy never accepts a multi-search that
Elasticsearch would refuse.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from . import es_json


@dataclass(frozen=True)
class Pair:
    """One sub-search: the header line's bytes (sent on unchanged) and the parsed body."""

    header_line: bytes
    header: dict[str, Any]
    body: dict[str, Any]


def _object(line: bytes) -> dict[str, Any] | None:
    try:
        value = es_json.parse_body(line)
    except (orjson.JSONDecodeError, es_json.DuplicateKey):
        return None
    return value if isinstance(value, dict) else None


def parse_pairs(raw: bytes) -> list[Pair] | None:
    """The sub-searches of a ``_msearch`` body, or None when it is not plainly well-formed."""
    if not raw.endswith(b"\n"):
        return None
    lines = raw[:-1].split(b"\n")
    if len(lines) % 2 or not lines:
        return None
    pairs: list[Pair] = []
    for header_line, body_line in zip(lines[::2], lines[1::2], strict=True):
        header, body = _object(header_line), _object(body_line)
        if header is None or body is None:
            return None
        pairs.append(Pair(header_line, header, body))
    return pairs


def write_pairs(pairs: Iterable[tuple[bytes, dict[str, Any]]]) -> bytes:
    """A ``_msearch`` body from header lines and body objects."""
    return b"".join(header + b"\n" + orjson.dumps(body) + b"\n" for header, body in pairs)
