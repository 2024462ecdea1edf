"""The throughput benchmark runs from a fresh clone: tiny model, real Elasticsearch, quick mode.

Figures are not asserted (tests assert behaviour, not timings); what is checked is that every
section ran, every proxied search was really reranked, and the JSON and plot were written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run_benchmark(script: str, *args: str, out: Path, timeout: int) -> Any:
    """Run ``benchmarks/<script>`` offline as a user would and return the JSON it wrote to ``out``."""
    run = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


DATA = ROOT.parent / "shared" / "data" / "trec-dl19"


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data/trec-dl19 is not beside the clone")
def test_throughput_benchmark_runs_end_to_end(es_url: str, tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    args = ["--model", "tiny", "--quick", "--es-url", es_url, "--out", str(out)]
    result = run_benchmark("throughput.py", *args, out=out, timeout=900)
    assert out.with_suffix(".png").stat().st_size > 10_000
    for mix in ("mix", "dl19", "fixed256"):
        row = result["scorer"][mix]
        assert row["naive_pairs_per_s"] > 0 and row["engine_pairs_per_s"] > 0
        assert row["engine_padding_overhead"] >= 1.0
    e2e = result["end_to_end"]
    assert set(e2e["levels"]) == {"1", "8", "32"}
    for level in e2e["levels"].values():
        assert set(level["proxy"]["statuses"]) == {"reranked"}, level["proxy"]["statuses"]
        assert set(level["direct"]["statuses"]) == {"direct"}
    assert e2e["pairs_per_search"] == 100 and e2e["proxy_peak_rss_mib"] > 50
    assert "cpu_engine_vs_naive_on_mix >= 2" in result["targets"]


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data/trec-dl19 is not beside the clone")
def test_profile_benchmark_splits_the_proxy_cpu(es_url: str, tmp_path: Path) -> None:
    """A few seconds at 4 clients: every category has a figure, the shares add up, searches were
    reranked in the window, and the native threads py-spy cannot see were found and counted."""
    out = tmp_path / "profile.json"
    args = ["--model", "tiny", "--clients", "4", "--seconds", "3", "--warmup", "1"]
    result = run_benchmark(
        "cpu_profile.py", *args, "--es-url", es_url, "--out", str(out), out=out, timeout=600
    )
    cpu = result["cpu"]
    categories = {"forward", "tokenize", "batch tensors", "json", "http & event loop", "other"}
    assert set(cpu["cpu_s"]) == set(cpu["share"]) == set(cpu["samples"]) == categories
    assert sum(cpu["share"].values()) == pytest.approx(1.0)
    assert sum(cpu["samples_x_interval"]["share"].values()) == pytest.approx(1.0)
    assert 0.0 <= cpu["outside_forward_share"] <= 1.0
    assert cpu["process_cpu_s"] > 0 and cpu["samples"]["forward"] > 0
    assert cpu["attributed_cpu_s"] == pytest.approx(cpu["process_cpu_s"], rel=0.05)
    # The Rust tokenizer's pool does the tokenizing; the launcher made its threads recognisable.
    assert cpu["native_cpu_s"]["tokenizer_pool"] > 0
    assert result["traffic"]["outcomes"].get("reranked", 0) > 0
    assert result["setup"]["clients"] == 4 and result["setup"]["uptime_start"]


NOVELEVAL = ROOT.parent / "shared" / "data" / "noveleval"


@pytest.mark.skipif(
    not (DATA.is_dir() and NOVELEVAL.is_dir()), reason="../shared/data is not beside the clone"
)
def test_relevance_benchmark_measures_every_fusion_setting_both_ways(
    es_url: str, tiny_model: Path, tmp_path: Path
) -> None:
    """The fusion sweep, fixed candidates and through the proxy (per-request settings), on 3 queries;
    every proxied search reranked, every row and the fusion table written."""
    args = ["--model", str(tiny_model), "--fusion", "sweep", "--collections", "noveleval"]
    args += ["--max-queries", "3", "--es-url", es_url, "--index-prefix", "test-fusion-"]
    args += ["--out-dir", str(tmp_path), "--tag", "smoke"]
    result = run_benchmark("relevance.py", *args, out=tmp_path / "relevance-smoke.json", timeout=600)
    name = str(tiny_model)
    rows = [name] + [f"{name}+{k}" for k in ("rrf:60", "linear:0.3", "linear:0.5", "linear:0.7")]
    assert result["setup"]["fusions"] == ["none", "rrf:60", "linear:0.3", "linear:0.5", "linear:0.7"]
    assert set(result["fixed_candidates"]["models"]) == set(rows)
    proxied = result["end_to_end"]["collections"]["noveleval"]["models"]
    assert set(proxied) == set(rows)
    for row in rows:
        assert proxied[row]["statuses"] == {"reranked": 3}, (row, proxied[row]["statuses"])
        assert 0.0 <= proxied[row]["ndcg@10"] <= 1.0
    assert set(result["fusion_summary"]) == set(rows)
    table = (tmp_path / "relevance-smoke.md").read_text()
    assert "| nDCG@10 ×100 (Δ vs BM25) |" in table and "rrf k=60" in table
    assert (tmp_path / "relevance-smoke.png").stat().st_size > 10_000


@pytest.mark.skipif(not NOVELEVAL.is_dir(), reason="../shared/data/noveleval is not beside the clone")
def test_overhead_benchmark_measures_shadow_mode(es_url: str, tmp_path: Path) -> None:
    """A few requests per case, the shadow proxy included: its answers say shadow, and its stats show
    the comparisons made in the background."""
    out = tmp_path / "overhead.json"
    args = ["--es-url", es_url, "--requests", "5", "--cases", "search_rerank_off", "search_shadow"]
    result = run_benchmark("overhead.py", *args, "--out", str(out), out=out, timeout=600)
    shadow = result["search_shadow"]
    assert shadow["shadow_statuses"] == ["skipped/shadow"]
    assert shadow["comparisons_finished"] == 5 and shadow["shadow_stats"]["compared"] >= 5
    assert shadow["shadow_stats"]["dropped"] == 0
    for key in ("direct_p50_ms", "serve_off_p50_ms", "shadow_off_p50_ms", "shadow_p50_ms"):
        assert shadow[key] > 0
    assert set(result) == {"search_rerank_off", "search_shadow", "setup"}


@pytest.mark.skipif(not NOVELEVAL.is_dir(), reason="../shared/data/noveleval is not beside the clone")
def test_overhead_benchmark_measures_metrics_and_access_log(es_url: str, tmp_path: Path) -> None:
    """The observability case: both proxies answered every request, and only the one as shipped
    counted them in its metrics."""
    out = tmp_path / "overhead.json"
    args = ["--es-url", es_url, "--requests", "20", "--cases", "observability"]
    result = run_benchmark("overhead.py", *args, "--out", str(out), out=out, timeout=600)
    observed = result["observability"]
    assert set(observed) == {"pass_through_get", "search_rerank_off", "search_reranked", "requests_recorded"}
    for case in ("pass_through_get", "search_rerank_off", "search_reranked"):
        assert observed[case]["on_p50_ms"] > 0 and observed[case]["off_p50_ms"] > 0
    # Its start-up probe (GET /_cluster/health), 10 warm-up searches and the measured requests
    # (20 + 20 + 20), each sent to both.
    assert observed["requests_recorded"] == {"on": 71, "off": 0}
