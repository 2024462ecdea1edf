"""The YAML file's ``models:`` and ``rules:`` sections: what each entry becomes, and errors naming the
entry's key (``models.<name>.<key>``, ``rules[i].<key>``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import DEFAULT_MODEL, Config, ConfigError
from proxy.config_load import load_config

BASE = """\
rerank:
  model: english-model
  device: cpu
  top_k: 50
  field: [text]
  max_length: 128
"""


def load(tmp_path: Path, text: str, base: str = BASE) -> Config:
    path = tmp_path / "proxy.yaml"
    path.write_text(base + text, encoding="utf-8")
    return load_config(path)


def test_models_inherit_the_rerank_section_and_rules_their_search_settings(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """\
models:
  german:
    model: deepset/gbert-base-germandpr-reranking
    max_length: 256
rules:
  - index: docs-de-*, faq-de
    model: german
    field: [title, body]
  - index: [logs-*]
    enabled: false
  - index: titles
    top_k: 20
""",
    )
    german = cfg.models["german"]
    assert (german.model, german.max_length, german.device) == (
        "deepset/gbert-base-germandpr-reranking",
        256,
        "cpu",
    )
    first, logs, titles = cfg.rules
    assert (first.index, first.model) == (("docs-de-*", "faq-de"), "german")
    # the model's own settings, the rule's field, the rerank section's top_k
    assert (first.rerank.model, first.rerank.max_length) == ("deepset/gbert-base-germandpr-reranking", 256)
    assert (first.rerank.field, first.rerank.top_k) == (("title", "body"), 50)
    assert (logs.model, logs.rerank.enabled, logs.rerank.model) == (DEFAULT_MODEL, False, "english-model")
    assert (titles.rerank.top_k, titles.rerank.field) == (20, ("text",))


def test_only_models_a_search_can_reach_are_loaded(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """\
models:
  german: {model: g}
  unused: {model: u}
  retired: {model: r}
rules:
  - index: de-*
    model: german
  - index: old-*
    model: retired
    enabled: false
""",
    )
    assert set(cfg.models_in_use()) == {DEFAULT_MODEL, "german"}
    rule_only = (
        "models:\n  german: {model: g}\nrules:\n  - index: de-*\n    model: german\n    enabled: true\n"
    )
    in_use = load(tmp_path, rule_only, BASE + "  enabled: false\n").models_in_use()
    assert {name: m.model for name, m in in_use.items()} == {"german": "g"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: [a]\n", "models: expected a mapping"),
        ("models:\n  'bad name': {model: x}\n", "models: a model's name"),
        ("models:\n  default: {model: x}\n", "models.default: 'default' is the rerank section's"),
        ("models:\n  m: x\n", "models.m: expected a mapping"),
        ("models:\n  m: {device: cpu}\n", "models.m.model: must name the model"),
        ("models:\n  m: {model: x, top_k: 5}\n", "models.m.top_k: a search setting"),
        ("models:\n  m: {model: x, modle: y}\n", "unknown configuration key 'models.m.modle'"),
        ("models:\n  m: {model: x, max_length: 4}\n", "models.m.max_length: must be >= 8"),
        ("models:\n  m: {model: x, dtype: fp8}\n", "models.m.dtype:"),
        ("models:\n  m: {model: x, backend: tei}\n", "models.m.backend_url:"),
        ("rules: {index: a}\n", "rules: expected a list"),
        ("rules:\n  - a\n", "rules[0]: expected a mapping"),
        ("rules:\n  - index: a\n  - model: default\n", "rules[1].index: every rule names"),
        ("rules:\n  - index: []\n", "rules[0].index: must name at least one"),
        ("rules:\n  - index: ['a', '']\n", "rules[0].index: must name at least one"),
        ("rules:\n  - index: 5\n", "rules[0].index: expected an index pattern"),
        ("rules:\n  - index: a\n    fields: [t]\n", "unknown configuration key 'rules[0].fields'"),
        ("rules:\n  - index: a\n    device: cpu\n", "rules[0].device: a model setting"),
        ("rules:\n  - index: a\n    model: german\n", "rules[0].model: no model named 'german'"),
        ("rules:\n  - index: a\n    enabled: maybe\n", "rules[0].enabled: expected true or false"),
        ("rules:\n  - index: a\n    top_k: 0\n", "rules[0].top_k: must be >= 1"),
        ("rules:\n  - index: a\n    top_k: 5000\n", "rules[0].top_k: must be <= rerank.max_top_k (1000)"),
        ("rules:\n  - index: a\n    field: {a: 1}\n", "rules[0].field:"),
    ],
)
def test_errors_name_the_entrys_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert str(info.value).startswith(message), str(info.value)


def test_a_misspelt_model_name_gets_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^rules\[0\]\.model: no model named 'germna' .*'german'"):
        load(tmp_path, "models:\n  german: {model: g}\nrules:\n  - index: a\n    model: germna\n")
