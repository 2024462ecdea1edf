"""Configuration: sources, precedence, validation and error messages that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config, ConfigError, RerankConfig, UpstreamConfig, mask_url
from proxy.config_load import load_config


def write(tmp_path: Path, text: str, name: str = "proxy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.server.port == 8000
    assert cfg.upstream.url == "http://localhost:9200"
    assert cfg.rerank.field == ("text",)
    assert cfg.rerank.query_path is None


def test_yaml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "server:\n  port: 9001\n  log_level: debug\n"
        "upstream:\n  url: https://es:9243\n  timeout_s: 3\n  verify_certs: no\n"
        "rerank:\n  field: [title, body.text]\n  top_k: 5\n  query_path: query.match.t.query\n",
    )
    cfg = load_config(path)
    assert cfg.server.port == 9001
    assert cfg.server.log_level == "debug"
    assert cfg.upstream.url == "https://es:9243"
    assert cfg.upstream.timeout_s == 3.0
    assert isinstance(cfg.upstream.timeout_s, float)
    assert cfg.upstream.verify_certs is False
    assert cfg.rerank.field == ("title", "body.text")
    assert cfg.rerank.top_k == 5
    assert cfg.rerank.query_path == "query.match.t.query"
    assert cfg.rerank.model == RerankConfig().model  # untouched options keep their defaults


@pytest.mark.parametrize("text", ["", "# only a comment\n", "server:\n"])
def test_empty_yaml_means_defaults(tmp_path: Path, text: str) -> None:
    assert load_config(write(tmp_path, text)) == Config()


def test_yaml_single_field_string_is_one_field(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "rerank:\n  field: a,b\n")).rerank.field == ("a,b",)


def test_env_vars() -> None:
    env = {
        "RERANK_PROXY_SERVER_PORT": "9100",
        "RERANK_PROXY_RERANK_FIELD": "title, body.text",
        "RERANK_PROXY_RERANK_ENABLED": "off",
        "RERANK_PROXY_UPSTREAM_VERIFY_CERTS": "YES",
        "RERANK_PROXY_UPSTREAM_CONNECT_TIMEOUT_S": "1.5",
        "RERANK_PROXY_RERANK_QUERY_PATH": "",
        "PATH": "/usr/bin",  # not ours: ignored
    }
    cfg = load_config(env=env)
    assert cfg.server.port == 9100
    assert cfg.rerank.field == ("title", "body.text")
    assert cfg.rerank.enabled is False
    assert cfg.upstream.verify_certs is True
    assert cfg.upstream.connect_timeout_s == 1.5
    assert cfg.rerank.query_path is None


def test_config_file_from_env(tmp_path: Path) -> None:
    from_env = write(tmp_path, "rerank:\n  top_k: 3\n", "env.yaml")
    explicit = write(tmp_path, "rerank:\n  top_k: 4\n", "explicit.yaml")
    env = {"RERANK_PROXY_CONFIG": str(from_env)}
    assert load_config(env=env).rerank.top_k == 3
    assert load_config(explicit, env=env).rerank.top_k == 4


def test_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, "rerank:\n  top_k: 5\n  max_batch_pairs: 2\n")
    env = {"RERANK_PROXY_RERANK_TOP_K": "6", "RERANK_PROXY_RERANK_MAX_LENGTH": "64"}
    over = {"rerank.top_k": "7"}
    cfg = load_config(path, env, over)
    assert (cfg.rerank.top_k, cfg.rerank.max_length, cfg.rerank.max_batch_pairs) == (7, 64, 2)
    assert load_config(path, env).rerank.top_k == 6
    assert load_config(path).rerank.top_k == 5
    assert load_config().rerank.top_k == 100


def test_later_layer_can_fix_earlier_value(tmp_path: Path) -> None:
    # validation runs on the merged result, not on each layer
    path = write(tmp_path, "rerank:\n  top_k: 2000\n")
    assert load_config(path, overrides={"rerank.max_top_k": "5000"}).rerank.top_k == 2000


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        (
            {"env": {"RERANK_PROXY_RERANK_TOPK": "5"}},
            ["RERANK_PROXY_RERANK_TOPK", "RERANK_PROXY_RERANK_TOP_K"],
        ),
        ({"overrides": {"rerank.topk": "5"}}, ["rerank.topk", "did you mean 'rerank.top_k'"]),
        ({"overrides": {"nothing.like.it": "5"}}, ["nothing.like.it"]),
    ],
)
def test_unknown_keys(kwargs: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("rerank:\n  topk: 5\n", ["rerank.topk", "did you mean 'rerank.top_k'"]),
        ("rerankk:\n  top_k: 5\n", ["rerankk", "did you mean 'rerank'"]),
        ("server:\n  prot: 1\n", ["server.prot", "server.port"]),
        ("- a\n- b\n", ["mapping"]),
        ("server: 8000\n", ["server", "mapping"]),
    ],
)
def test_bad_yaml_structure(tmp_path: Path, text: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    for needle in needles:
        assert needle in str(info.value)


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 1\n  host: [unclosed\n", "broken.yaml")
    with pytest.raises(ConfigError, match=r"broken\.yaml") as info:
        load_config(path)
    assert "line" in str(info.value)


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"server.port": "0"}, "server.port"),
        ({"server.port": "70000"}, "server.port"),
        ({"server.port": "eighty"}, "server.port"),
        ({"server.port": "80.5"}, "server.port"),
        ({"server.max_body_bytes": "0"}, "server.max_body_bytes"),
        ({"server.log_level": "verbose"}, "server.log_level"),
        ({"rerank.top_k": "-1"}, "rerank.top_k"),
        ({"rerank.top_k": "0"}, "rerank.top_k"),
        ({"rerank.top_k": "50", "rerank.max_top_k": "10"}, "rerank.max_top_k"),
        ({"rerank.max_length": "4"}, "rerank.max_length"),
        ({"rerank.max_batch_pairs": "0"}, "rerank.max_batch_pairs"),
        ({"rerank.max_batch_tokens": "100"}, "rerank.max_batch_tokens"),  # below max_length 256
        ({"rerank.max_wait_ms": "-1"}, "rerank.max_wait_ms"),
        ({"rerank.max_queued_pairs": "0"}, "rerank.max_queued_pairs"),
        ({"rerank.cache_entries": "-5"}, "rerank.cache_entries"),
        ({"rerank.dtype": "fp8"}, "rerank.dtype"),
        ({"rerank.threads": "-1"}, "rerank.threads"),
        ({"rerank.compile": "sometimes"}, "rerank.compile"),
        ({"rerank.max_windows": "0"}, "rerank.max_windows"),
        ({"rerank.max_windows": "4", "rerank.window_overlap": "200"}, "rerank.window_overlap"),
        ({"rerank.timeout_ms": "0"}, "rerank.timeout_ms"),
        ({"rerank.device": "gpu"}, "rerank.device"),
        ({"rerank.device": "cuda:x"}, "rerank.device"),
        ({"rerank.model": "  "}, "rerank.model"),
        ({"rerank.field": "a,,b"}, "rerank.field"),
        ({"rerank.enabled": "maybe"}, "rerank.enabled"),
        ({"upstream.url": "ftp://es:9200"}, "upstream.url"),
        ({"upstream.url": "localhost:9200"}, "upstream.url"),
        ({"upstream.url": "http://"}, "upstream.url"),
        ({"upstream.timeout_s": "0"}, "upstream.timeout_s"),
        ({"upstream.timeout_s": "soon"}, "upstream.timeout_s"),
        ({"upstream.connect_timeout_s": "-1"}, "upstream.connect_timeout_s"),
        ({"upstream.max_connections": "0"}, "upstream.max_connections"),
        ({"upstream.ca_certs": "/no/such/ca.pem"}, "upstream.ca_certs"),
    ],
)
def test_bad_values_name_the_key(overrides: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("server:\n  port: yes\n", "server.port"),  # YAML 1.1 reads yes as a boolean
        ("rerank:\n  model: off\n", "rerank.model"),
        ("rerank:\n  top_k: 2.5\n", "rerank.top_k"),
        ("rerank:\n  enabled: 1\n", "rerank.enabled"),
        ("rerank:\n  field: {a: 1}\n", "rerank.field"),
        ("rerank:\n  model:\n", "rerank.model"),
        ("upstream:\n  timeout_s: true\n", "upstream.timeout_s"),
    ],
)
def test_bad_yaml_values_name_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, yaml_text))
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("yes", True), ("on", True), ("1", True), ("TRUE", True), ("off", False), ("no", False), ("0", False)],
)
def test_boolean_words_from_text(value: str, expected: bool) -> None:
    assert load_config(env={"RERANK_PROXY_RERANK_ENABLED": value}).rerank.enabled is expected


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_good_devices(device: str) -> None:
    assert load_config(overrides={"rerank.device": device}).rerank.device == device


def test_ca_certs_existing_file(tmp_path: Path) -> None:
    import certifi  # a real CA bundle: the file must load as certificates, not merely exist

    ca = write(tmp_path, Path(certifi.where()).read_text(encoding="utf-8"), "ca.pem")
    assert load_config(overrides={"upstream.ca_certs": str(ca)}).upstream.ca_certs == str(ca)


def test_ca_certs_without_certificates(tmp_path: Path) -> None:
    ca = write(tmp_path, "-----BEGIN CERTIFICATE-----\n", "ca.pem")
    with pytest.raises(ConfigError, match=r"^upstream\.ca_certs: holds no readable certificate"):
        load_config(overrides={"upstream.ca_certs": str(ca)})


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("https://elastic:s3cret@es.example:9243/path", "https://elastic:***@es.example:9243/path"),
        ("http://u:p%40ss@ES-Host/", "http://u:***@ES-Host/"),
        ("http://u:pw@[::1]:9200", "http://u:***@[::1]:9200"),
        ("http://user@es:9200", "http://user@es:9200"),
        ("http://es:9200", "http://es:9200"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_repr_hides_password() -> None:
    up = UpstreamConfig(url="https://elastic:hunter2@es:9243")
    assert "hunter2" not in repr(up)
    assert "elastic:***@es:9243" in repr(up)
    assert "hunter2" not in repr(Config(upstream=up))
