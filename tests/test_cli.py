"""The command line: flag errors as one stderr line, --print-config, and config/default.yaml."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from proxy.cli import main, render_default_yaml
from proxy.config import ENV_PREFIX, Config
from proxy.config_load import load_config

DEFAULT_YAML = Path(__file__).resolve().parent.parent / "config" / "default.yaml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith(ENV_PREFIX):
            monkeypatch.delenv(var)


def printed_config(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, dict[str, object]]:
    assert main([*argv, "--print-config"]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    data = yaml.safe_load(out.out)
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--rerank-top-k", "many"], "rerank.top_k"),
        (["--server-port", "0"], "server.port"),
        (["--upstream", "ftp://es"], "upstream.url"),
        (["--rerank-device", "gpu"], "rerank.device"),
        (["--config", "/no/such/file.yaml"], "/no/such/file.yaml"),
    ],
)
def test_bad_flag_value_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    assert main([*argv, "--print-config"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("rerank-proxy:")
    assert needle in lines[0]
    assert "Traceback" not in out.err


def test_bad_env_value_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RERANK_PROXY_RERANK_TOPK", "5")
    assert main(["--print-config"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("rerank-proxy:")
    assert "RERANK_PROXY_RERANK_TOP_K" in err[0]


def test_print_config_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    data = printed_config(capsys, [])
    assert data == yaml.safe_load(DEFAULT_YAML.read_text(encoding="utf-8"))


def test_print_config_reflects_flags_and_env(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RERANK_PROXY_RERANK_TOP_K", "7")
    monkeypatch.setenv("RERANK_PROXY_RERANK_MAX_BATCH_PAIRS", "4")
    monkeypatch.setenv("RERANK_PROXY_RERANK_FIELD", "title,body")
    data = printed_config(
        capsys,
        ["--rerank-top-k", "9", "--upstream", "https://elastic:hunter2@es:9243", "--server-port", "9000"],
    )
    assert data["rerank"]["top_k"] == 9  # flag beats env
    assert data["rerank"]["max_batch_pairs"] == 4
    assert data["rerank"]["field"] == ["title", "body"]
    assert data["server"]["port"] == 9000
    assert data["upstream"]["url"] == "https://elastic:***@es:9243"


def test_long_flag_beats_short_alias(capsys: pytest.CaptureFixture[str]) -> None:
    data = printed_config(capsys, ["--upstream", "http://short:1", "--upstream-url", "http://long:2"])
    assert data["upstream"]["url"] == "http://long:2"


def test_print_config_with_yaml_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("rerank:\n  top_k: 3\n  device: cpu\n", encoding="utf-8")
    data = printed_config(capsys, ["--config", str(path), "--rerank-device", "cuda:0"])
    assert data["rerank"]["top_k"] == 3
    assert data["rerank"]["device"] == "cuda:0"


def test_default_yaml_is_rendered_text() -> None:
    assert DEFAULT_YAML.read_text(encoding="utf-8") == render_default_yaml()


def test_default_yaml_loads_to_defaults() -> None:
    assert load_config(DEFAULT_YAML) == Config()


def test_readme_documents_every_option() -> None:
    from pathlib import Path

    from proxy.config import ENV_PREFIX, option_keys

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for key, _ in option_keys():
        assert f"`{key}`" in readme, key
        assert ENV_PREFIX + key.replace(".", "_").upper() in readme, key


def test_readme_table_carries_each_options_help_text() -> None:
    """The README's configuration table says what --help and config/default.yaml say, word for word."""
    from proxy.config import option_keys

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(): line for line in readme.splitlines() if line.startswith("| `")}
    for key, f in option_keys():
        assert rows[f"`{key}`"].rstrip().endswith(f"| {f.metadata['help']} |"), key


def test_start_up_line_names_every_model_a_search_can_reach(tmp_path: Path) -> None:
    from proxy.cli import _models_line

    assert _models_line(load_config(overrides={"rerank.model": "m-en"})) == "model m-en"
    assert _models_line(load_config(overrides={"rerank.enabled": "false"})) == "reranking disabled"
    path = tmp_path / "rules.yaml"
    path.write_text(
        "rerank: {model: m-en}\nmodels: {german: {model: m-de}, unused: {model: m-x}}\n"
        "rules: [{index: de-*, model: german}]\n",
        encoding="utf-8",
    )
    assert _models_line(load_config(path)) == "models default: m-en, german: m-de"
