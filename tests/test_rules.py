"""Which rule a search goes by (proxy/rules.py), and the plan it gets from that rule (no server)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from proxy.config import DEFAULT_MODEL, Config, RerankConfig, Rule
from proxy.rules import (
    ALL,
    Choice,
    Mixed,
    choose,
    default_rule,
    item_indices,
    parse_indices,
    path_indices,
    pattern_matches,
)
from proxy.search_plan import Overrides, Passthrough, RerankPlan, plan_request

BASE = RerankConfig()
DEFAULT = default_rule(BASE)
GERMAN = Rule(("docs-de-*", "faq-de"), "german", replace(BASE, model="german-model", top_k=30))
LOGS = Rule(("logs-*",), DEFAULT_MODEL, replace(BASE, enabled=False))
TITLES = Rule(("titles",), DEFAULT_MODEL, replace(BASE, field=("title",)))
SAME_AS_DEFAULT = Rule(("plain-*",), DEFAULT_MODEL, BASE)
GERMAN_TOO = Rule(("wiki-de",), "german", replace(BASE, model="german-model", top_k=30))
CATCH_ALL = Rule(("*",), "german", replace(BASE, model="german-model"))
RULES = (GERMAN, LOGS, TITLES, SAME_AS_DEFAULT, GERMAN_TOO)


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("docs", "docs", True),
        ("docs", "docs2", False),
        ("docs*", "docs", True),
        ("docs-*", "docs-de", True),
        ("docs-*", "docs", False),
        ("*-de", "docs-de", True),
        ("*-de", "docs-de-old", False),
        ("d*s-*-old", "docs-de-old", True),
        ("*", "anything", True),
        ("*", ALL, True),
        ("Docs", "docs", False),  # case-sensitive, as index names are
        ("docs?", "docs1", False),  # only * is a wildcard
        ("docs.v1", "docsXv1", False),  # a dot is a dot
        ("docs[12]", "docs[12]", True),
        ("docs-*", "docs-*", True),  # a request wildcard is matched as text
        ("docs-de-*", "docs-*", False),
    ],
)
def test_pattern_matching(pattern: str, name: str, matches: bool) -> None:
    assert pattern_matches(pattern, name) is matches


@pytest.mark.parametrize(
    ("expression", "names", "excluded"),
    [
        (None, (ALL,), ()),
        ("", (ALL,), ()),
        ("docs", ("docs",), ()),
        ("a,b", ("a", "b"), ()),
        ("a, b ,,c", ("a", "b", "c"), ()),
        ("docs-*,-docs-old", ("docs-*",), ("-docs-old",)),
        ("-docs-old", (ALL,), ("-docs-old",)),
        (["a", "b,c"], ("a", "b", "c"), ()),
        ([], (ALL,), ()),
    ],
)
def test_index_expressions(
    expression: str | list[str] | None, names: tuple[str, ...], excluded: tuple[str, ...]
) -> None:
    indices = parse_indices(expression)
    assert (indices.names, indices.excluded) == (names, excluded)


@pytest.mark.parametrize(
    ("path", "expression"),
    [
        ("/docs/_search", "docs"),
        ("/docs-de-1,docs-en/_search", "docs-de-1,docs-en"),
        ("/docs-de-1%2Cdocs-en/_search", "docs-de-1,docs-en"),  # an encoded comma is a comma
        ("/docs-*/_msearch/template", "docs-*"),
        ("/_search", None),
        ("/_msearch", None),
        ("/_all/_search", None),
        ("/_search/template", None),
    ],
)
def test_the_paths_index_expression(path: str, expression: str | None) -> None:
    assert path_indices(path) == expression


@pytest.mark.parametrize(
    ("header", "url", "expression"),
    [
        ({"index": "docs-de-1"}, "docs-en", "docs-de-1"),
        ({"index": ["docs-de-1", "faq-de"]}, None, ["docs-de-1", "faq-de"]),
        ({}, "docs-en", "docs-en"),
        ({"preference": "x"}, None, None),
        ({"index": 7}, "docs-en", "docs-en"),  # not an index: Elasticsearch judges the header itself
        ({"index": []}, "docs-en", "docs-en"),
    ],
)
def test_an_msearch_items_index_expression(
    header: dict[str, Any], url: str | None, expression: str | list[str] | None
) -> None:
    assert item_indices(header, url) == expression


@pytest.mark.parametrize(
    ("expression", "rule"),
    [
        ("docs-de-1", GERMAN),
        ("faq-de", GERMAN),
        ("docs-de-1,docs-de-2", GERMAN),
        (["docs-de-1", "faq-de"], GERMAN),
        ("docs-de-*", GERMAN),  # a request wildcard inside the rule's pattern
        ("docs-de-1,wiki-de", GERMAN),  # two rules, one model, the same settings: one rule
        ("docs-en", DEFAULT),
        ("docs-*", DEFAULT),  # may reach English indices too: not the German rule
        ("faq-de-2", DEFAULT),
        (None, DEFAULT),  # /_search
        (ALL, DEFAULT),
        ("*", DEFAULT),
        ("logs-2024", LOGS),
        ("titles", TITLES),
        ("plain-1,docs-en", DEFAULT),  # a rule that changes nothing is the default
        ("docs-de-1,-docs-de-old", GERMAN),  # an exclusion picks no rule
        ("docs-en,-docs-de-1", DEFAULT),
    ],
)
def test_the_rule_a_search_goes_by(expression: str | list[str] | None, rule: Rule) -> None:
    choice = choose(expression, RULES, DEFAULT)
    assert isinstance(choice, Choice)
    assert (choice.rule.model, choice.rule.rerank) == (rule.model, rule.rerank)


def test_the_first_matching_rule_wins() -> None:
    first = Rule(("docs-*",), DEFAULT_MODEL, replace(BASE, top_k=7))
    second = Rule(("docs-de-*",), "german", replace(BASE, model="german-model"))
    assert choose("docs-de-1", (first, second), DEFAULT) == Choice(first)
    assert choose("docs-de-1", (second, first), DEFAULT) == Choice(second)


def test_exclusions_are_kept_for_the_log() -> None:
    assert choose("docs-de-*,-docs-de-old", RULES, DEFAULT) == Choice(GERMAN, ("-docs-de-old",))


@pytest.mark.parametrize(
    ("expression", "picks"),
    [
        ("docs-de-1,docs-en", (("docs-de-1", "german"), ("docs-en", DEFAULT_MODEL))),
        (["docs-en", "faq-de"], (("docs-en", DEFAULT_MODEL), ("faq-de", "german"))),
        ("docs-en,logs-1", (("docs-en", DEFAULT_MODEL), ("logs-1", DEFAULT_MODEL))),  # same model, off
        ("titles,docs-en", (("titles", DEFAULT_MODEL), ("docs-en", DEFAULT_MODEL))),  # another field
    ],
)
def test_indices_of_different_rules_are_mixed(expression: str | list[str], picks: tuple[Any, ...]) -> None:
    choice = choose(expression, RULES, DEFAULT)
    assert choice == Mixed(picks)
    assert choice.reason == "mixed_rules"


@pytest.mark.parametrize("expression", [None, ALL, "*", "docs-en", "docs-de-1,docs-en"])
def test_a_catch_all_rule_takes_every_search(expression: str | None) -> None:
    assert choose(expression, (CATCH_ALL,), DEFAULT) == Choice(CATCH_ALL)


def test_a_rule_for_all_takes_searches_that_name_no_index() -> None:
    everything = Rule((ALL,), "german", replace(BASE, model="german-model"))
    assert choose(None, (everything,), DEFAULT) == Choice(everything)
    assert choose("docs-en", (everything,), DEFAULT) == Choice(DEFAULT)


# -- the plan a rule gives --------------------------------------------------------------------------

CFG = Config(rerank=replace(BASE, top_k=100), rules=RULES)
BODY = {"query": {"match": {"text": "kaffee kochen"}}, "size": 10}


def plan(indices: str | list[str] | None, overrides: Overrides | None = None) -> RerankPlan | Passthrough:
    return plan_request([], BODY, CFG, overrides or Overrides(), "elasticsearch", indices)


def test_a_rules_settings_and_model_make_the_plan() -> None:
    german = plan("docs-de-1")
    assert isinstance(german, RerankPlan)
    assert (german.model, german.top_k, german.body["size"]) == ("german", 30, 30)
    titles = plan("titles")
    assert isinstance(titles, RerankPlan)
    assert (titles.model, titles.fields, titles.top_k) == (DEFAULT_MODEL, ("title",), 100)
    default = plan(None)
    assert isinstance(default, RerankPlan)
    assert (default.model, default.fields, default.top_k) == (DEFAULT_MODEL, ("text",), 100)


def test_a_disabled_rule_and_mixed_rules_pass_through() -> None:
    assert plan("logs-1") == Passthrough("disabled")
    assert plan("docs-de-1,docs-en") == Passthrough("mixed_rules")


def test_a_request_cannot_turn_a_disabled_rule_on_but_can_narrow_an_enabled_one() -> None:
    assert plan("logs-1", Overrides(enabled=True)) == Passthrough("disabled")
    narrowed = plan("docs-de-1", Overrides(top_k=5))
    assert isinstance(narrowed, RerankPlan) and (narrowed.model, narrowed.top_k) == ("german", 5)


def test_a_rule_enabled_under_a_disabled_rerank_section() -> None:
    on = Rule(("docs-de-*",), "german", replace(BASE, model="german-model", enabled=True))
    cfg = Config(rerank=replace(BASE, enabled=False), rules=(on,))
    german = plan_request([], BODY, cfg, Overrides(), "elasticsearch", "docs-de-1")
    assert isinstance(german, RerankPlan) and german.model == "german"
    other = plan_request([], BODY, cfg, Overrides(), "elasticsearch", "docs-en")
    assert other == Passthrough("disabled")
