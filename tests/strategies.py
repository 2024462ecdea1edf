"""Hypothesis strategies shared by the property tests.

Two kinds: arbitrary JSON, as a client may send it (what the parsers must survive), and documents
and ``_source`` filters over a small alphabet of field names and pattern segments, so that patterns,
documents and passage fields meet often (what exercises the filtering rules). JSON values are what
the proxy's parser (orjson) yields: no NaN or infinity, integers within 64 bits.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from proxy.source_filter import SOURCE_PARAMS

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=24,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=6)

# Field names: plain, the passage field, and names with dots (matched like the object path they spell).
KEYS = ("a", "b", "ab", "text", "a.b", "b.text")
# Pattern segments: names, wildcards within a level, and ``**`` (one or more levels).
SEGMENTS = ("a", "b", "ab", "text", "*", "a*", "*t", "te*", "**")
PASSAGE_FIELDS = ("text", "a.text", "b")

_small_scalars = st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["", "p", "q r"])
source_values: st.SearchStrategy[Any] = st.recursive(
    _small_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=3),
    max_leaves=10,
)
documents = st.dictionaries(st.sampled_from(KEYS), source_values, max_size=4)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    pattern = ".".join(draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3)))
    return draw(st.sampled_from([pattern, pattern, pattern, f" {pattern}", f"{pattern} ", ""]))


pattern_lists = st.lists(patterns(), max_size=3)
passage_fields = st.lists(st.sampled_from(PASSAGE_FIELDS), min_size=1, max_size=2, unique=True).map(tuple)

_pattern_value = patterns() | pattern_lists
# Every form a body's ``_source`` takes: boolean, one pattern, an array, an object with any of the
# four keys (plain and deprecated), each a string or an array.
body_sources: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    patterns(),
    pattern_lists,
    st.dictionaries(
        st.sampled_from(["includes", "include", "excludes", "exclude"]), _pattern_value, max_size=3
    ),
)


def _param_value() -> st.SearchStrategy[str]:
    joined = pattern_lists.map(",".join)
    return st.sampled_from(["true", "false", "", ",", "1", "no"]) | joined


url_params = st.dictionaries(st.sampled_from(SOURCE_PARAMS), _param_value(), max_size=3)
