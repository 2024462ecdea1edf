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

import pytest

from .conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA = ROOT.parent / "shared" / "data" / "trec-dl19"


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data/trec-dl19 is not beside the clone")
def test_throughput_benchmark_runs_end_to_end(es_url: str, tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, "benchmarks/throughput.py", "--model", "tiny", "--quick", "--es-url", es_url]
    run = subprocess.run(
        [*cmd, "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
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
