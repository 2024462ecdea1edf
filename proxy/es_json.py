"""Elasticsearch's JSON, read as strictly as Elasticsearch reads it and written as it writes it.

Reading: Elasticsearch's parser rejects duplicate keys anywhere in a body (Jackson's
``STRICT_DUPLICATE_DETECTION``), while orjson keeps the last value. A body that Elasticsearch would
refuse must never be accepted and rewritten by the proxy, so :func:`parse_body` reports duplicates and
the caller forwards the original bytes for Elasticsearch to answer with its own error.

Writing: answers the proxy rewrites are compact JSON like Elasticsearch's, or, with ``?pretty``,
Jackson's pretty layout exactly as Elasticsearch configures it (two-space indent, ``"key" : value``,
one array element per line, ``[ ]`` and ``{ }`` when empty, Java's number formatting, a final line
feed). The layout is pinned against a real server's own pretty answers in the tests.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

import orjson

# A JSON string token, escapes included: what is left after removing them holds no string content,
# so every remaining ``:`` separates one object key from its value.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


class DuplicateKey(ValueError):
    """The body repeats a key in one object, which Elasticsearch refuses."""


def _count_keys(node: Any) -> int:
    if isinstance(node, dict):
        return len(node) + sum(_count_keys(v) for v in node.values())
    if isinstance(node, list):
        return sum(_count_keys(v) for v in node)
    return 0


def parse_body(raw: bytes) -> Any:
    """The parsed JSON body; ``orjson.JSONDecodeError`` when it is not JSON, :class:`DuplicateKey`
    when an object repeats a key.

    Duplicates are found cheaply: the number of key separators in the bytes (colons outside string
    tokens, found by one C-level regex pass) must equal the number of keys the parsed value holds.
    """
    value = orjson.loads(raw)
    if isinstance(value, (dict, list)) and _STRING.sub(b"", raw).count(b":") != _count_keys(value):
        raise DuplicateKey("duplicate key in the JSON body")
    return value


def dumps(value: Any, pretty: bool = False) -> bytes:
    """The answer's bytes: compact, or Elasticsearch's ``?pretty`` layout."""
    if not pretty:
        return orjson.dumps(value)
    out: list[str] = []
    _pretty(value, 0, out)
    out.append("\n")
    return "".join(out).encode()


def java_double(value: float) -> str:
    """``Double.toString``: plain decimals in [1e-3, 1e7), else ``d.dddE±n``; the shortest digits."""
    if math.isnan(value) or math.isinf(value):  # never valid JSON; Jackson writes these names
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if value == 0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    magnitude = abs(value)
    if 1e-3 <= magnitude < 1e7:
        text = repr(value)  # Python, like Java, writes plain decimals in this range
        return text if "." in text else text + ".0"
    # repr gives the shortest round-tripping digits; Java lays them out as d.dddE<exponent>.
    digits = Decimal(repr(magnitude)).normalize().as_tuple()
    shown = "".join(map(str, digits.digits))
    exponent = len(shown) - 1 + int(digits.exponent)
    sign = "-" if value < 0 else ""
    return f"{sign}{shown[0]}.{shown[1:] or '0'}E{exponent}"


def _pretty(value: Any, level: int, out: list[str]) -> None:
    if isinstance(value, dict):
        if not value:
            out.append("{ }")
            return
        inner = "  " * (level + 1)
        out.append("{\n")
        for i, (key, item) in enumerate(value.items()):
            if i:
                out.append(",\n")
            out.append(f"{inner}{orjson.dumps(str(key)).decode()} : ")
            _pretty(item, level + 1, out)
        out.append("\n" + "  " * level + "}")
    elif isinstance(value, list):
        if not value:
            out.append("[ ]")
            return
        inner = "  " * (level + 1)
        out.append("[\n")
        for i, item in enumerate(value):
            if i:
                out.append(",\n")
            out.append(inner)
            _pretty(item, level + 1, out)
        out.append("\n" + "  " * level + "]")
    elif isinstance(value, float):
        out.append(java_double(value))
    else:
        out.append(orjson.dumps(value).decode())
