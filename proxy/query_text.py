"""Finding the user's query text inside an Elasticsearch search request.

The reranker needs the words the user typed, not the DSL. Full-text leaves (``match``,
``multi_match``, ``query_string``...) carry them; compound queries (``bool``, ``function_score``...)
only carry other queries. Clauses that filter rather than score (``filter``, ``must_not``, the
``negative`` side of ``boosting``) are skipped on purpose: their words say what the user does *not*
want ranked up. Several texts are joined in document order with duplicates removed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

# Leaves whose value is {field: "text"} or {field: {"query": "text"}}.
_FIELD_LEAVES = frozenset({"match", "match_phrase", "match_phrase_prefix", "match_bool_prefix"})
# Leaves whose value is {"query": "text", ...}.
_QUERY_LEAVES = frozenset({"multi_match", "combined_fields", "simple_query_string"})
# Compound queries: where each keeps the sub-queries that contribute to the score.
_COMPOUND_SINGLE = {
    "function_score": ("query",),
    "script_score": ("query",),
    "constant_score": ("filter",),
    "boosting": ("positive",),
    "nested": ("query",),
    "has_child": ("query",),
    "has_parent": ("query",),
}
_BOOL_SCORING = ("must", "should")

# A negated clause (-term, !term, NOT term, with an optional field and a group or phrase).
_LUCENE_NEGATED = re.compile(r'(?:(?<![\w\\])[-!]|\bNOT\s+)(?:[\w.*]+:)?(?:\([^)]*\)|"[^"]*"|\S+)')
_LUCENE_FIELD = re.compile(r"(?<![\w\\])[\w.*]+:(?=\S)")
_LUCENE_OPERATOR = re.compile(r"\b(?:AND|OR|NOT)\b|&&|\|\|")
_LUCENE_SYNTAX = re.compile(r"[+\-!(){}\[\]^\"~*?\\/]")
_LUCENE_FUZZ = re.compile(r"[~^][\d.]*")


def _leaves(query: Any) -> Iterator[str]:
    """Texts in document order. Iterative: a client's body may nest lists or queries a thousand deep
    (valid JSON that the JSON parser accepts), deeper than Python's recursion limit."""
    stack: list[tuple[bool, Any]] = [(False, query)]  # (is a text, text or node), next on top
    while stack:
        is_text, node = stack.pop()
        if is_text:
            yield node
        elif isinstance(node, list):
            stack.extend((False, item) for item in reversed(node))
        elif isinstance(node, dict):
            stack.extend(reversed(_parts(node)))


def _parts(query: dict[str, Any]) -> list[tuple[bool, Any]]:
    """One query object's texts and scoring sub-queries, in document order."""
    parts: list[tuple[bool, Any]] = []
    for kind, body in query.items():
        if not isinstance(body, dict):
            continue
        if kind in _FIELD_LEAVES:
            for value in body.values():
                if isinstance(value, str):
                    parts.append((True, value))
                elif isinstance(value, dict) and isinstance(value.get("query"), str):
                    parts.append((True, value["query"]))
        elif kind in _QUERY_LEAVES and isinstance(body.get("query"), str):
            parts.append((True, body["query"]))
        elif kind == "query_string" and isinstance(body.get("query"), str):
            parts.append((True, lucene_to_text(body["query"])))
        elif kind == "bool":
            parts.extend((False, body.get(clause)) for clause in _BOOL_SCORING)
        elif kind == "dis_max":
            parts.append((False, body.get("queries")))
        elif kind in _COMPOUND_SINGLE:
            parts.extend((False, body.get(key)) for key in _COMPOUND_SINGLE[kind])
    return parts


def lucene_to_text(query: str) -> str:
    """Plain words from Lucene query syntax (``title:(quick fox~2) AND brown^2``).

    A cross-encoder reads natural language; field prefixes, operators and fuzziness marks are noise.
    """
    text = _LUCENE_NEGATED.sub(" ", query)  # words the user does not want are no query text
    text = _LUCENE_FIELD.sub(" ", text)
    text = _LUCENE_FUZZ.sub(" ", text)
    text = _LUCENE_OPERATOR.sub(" ", text)
    text = _LUCENE_SYNTAX.sub(" ", text)
    return " ".join(text.split())


def _join_unique(texts: Iterator[str]) -> str | None:
    seen: list[str] = []
    for text in texts:
        text = " ".join(text.split())
        if text and text not in seen:
            seen.append(text)
    return " ".join(seen) or None


def extract_query_text(body: dict[str, Any]) -> str | None:
    """The query text of a search body's ``query``, or None when it has no full-text clause."""
    return _join_unique(_leaves(body.get("query")))


def text_at_path(body: dict[str, Any], path: str) -> str | None:
    """The string at a dotted path (``query.bool.must.0.match.title.query``), list indexes allowed."""
    node: Any = body
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isascii() and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    if isinstance(node, str) and node.strip():
        return node
    return None
