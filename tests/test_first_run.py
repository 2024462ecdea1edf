"""A first run that works on any machine: the default model, or the offline one when the Hub is out of
reach; a model the operator chose is never replaced."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.config import Config, RerankConfig
from proxy.config_load import explicit_keys
from proxy.first_run import DEFAULT_MODEL, OFFLINE_MODEL, hub_reachable, offline_fallback

from .conftest import free_port
from .test_command import _env

CFG = Config()


@pytest.mark.parametrize(
    ("explicit", "env", "reachable", "falls_back"),
    [
        (frozenset(), {"HF_HUB_OFFLINE": "1"}, None, True),
        (frozenset(), {}, False, True),
        (frozenset(), {}, True, False),
        (frozenset({"rerank.model"}), {"HF_HUB_OFFLINE": "1"}, False, False),  # the operator's choice
    ],
)
def test_offline_fallback_only_replaces_a_default_that_cannot_load(
    explicit: frozenset[str], env: dict[str, str], reachable: bool | None, falls_back: bool
) -> None:
    result = offline_fallback(CFG, explicit, env, reachable=reachable)
    if not falls_back:
        assert result is None
        return
    assert result is not None
    cfg, line = result
    assert (cfg.rerank.model, cfg.rerank.scorer) == (OFFLINE_MODEL, "bi-encoder")
    assert cfg.rerank.top_k == CFG.rerank.top_k and cfg.upstream == CFG.upstream
    assert "\n" not in line and DEFAULT_MODEL in line and "rerank.model" in line


def test_other_models_and_a_disabled_proxy_are_left_alone() -> None:
    other = replace(CFG, rerank=RerankConfig(model="some/other-model"))
    assert offline_fallback(other, frozenset(), {"HF_HUB_OFFLINE": "1"}) is None
    off = replace(CFG, rerank=RerankConfig(enabled=False))
    assert offline_fallback(off, frozenset(), {"HF_HUB_OFFLINE": "1"}) is None


def test_explicit_keys_name_what_a_source_set(tmp_path: pytest.TempPathFactory) -> None:
    yaml_file = tmp_path / "c.yaml"  # type: ignore[operator]
    yaml_file.write_text("rerank:\n  model: x\n")
    env = {"RERANK_PROXY_RERANK_TOP_K": "5"}
    assert explicit_keys(yaml_file, env, {"server.port": "9"}) == {
        "rerank.model",
        "rerank.top_k",
        "server.port",
    }
    assert explicit_keys(None, {}, {}) == frozenset()


def test_hub_check_is_bounded_and_true_only_for_an_open_port() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert hub_reachable(2.0, "127.0.0.1", listener.getsockname()[1])
    closed = free_port()
    started = time.monotonic()
    assert not hub_reachable(2.0, "127.0.0.1", closed)
    assert not hub_reachable(0.5, "host.invalid", 443)
    assert time.monotonic() - started < 3.0


@pytest.mark.slow
def test_command_without_the_hub_starts_with_the_offline_model() -> None:
    """``rerank-proxy`` with nothing configured, on a machine without the Hub: one line says which model
    it started with instead and how to choose, and the proxy serves."""
    port, admin = free_port(), free_port()
    env = _env(
        RERANK_PROXY_SERVER_PORT=str(port),
        RERANK_PROXY_SERVER_ADMIN_PORT=str(admin),
        RERANK_PROXY_RERANK_WARMUP="false",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "--upstream", "http://127.0.0.1:9"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        stats = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            # The admin listener answers while the model loads; the stats name it once it is loaded.
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/_rerank/stats", timeout=2) as r:
                    stats = json.loads(r.read())
                if stats["model"] is not None:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        assert stats is not None, proc.stdout.read() if proc.stdout else ""
        assert stats["model"] == OFFLINE_MODEL
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    notices = [line for line in out.splitlines() if "offline model" in line]
    assert len(notices) == 1 and "rerank.model" in notices[0]
    assert "Traceback" not in out and "Unclosed" not in out


@pytest.mark.slow
@pytest.mark.integration
def test_demo_prints_both_top_fives(es_url: str) -> None:
    """``make demo`` against a running Elasticsearch: the sample corpus indexed, one question asked both
    ways, five titles a side, the proxy's answer reranked."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, str(root / "scripts" / "demo.py"), "--es-url", es_url],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("X-Rerank-Status: reranked" in line for line in lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("Elasticsearch (BM25)"))
    rows = lines[header + 2 : header + 7]
    assert [row.split()[0] for row in rows] == ["1.", "2.", "3.", "4.", "5."]
    titles = {d["title"] for d in json.loads((root / "demo" / "corpus.json").read_text())}
    for row in rows:
        left, right = row[:38].strip()[3:], row[40:].strip()[3:]
        assert left in titles and right in titles
